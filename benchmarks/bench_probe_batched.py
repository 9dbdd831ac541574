"""Probe training speed: the batched ensemble vs its members trained one after another.

Both sides train the same M members for the same number of optimiser steps (``TrainConfig.max_steps``,
early stop disabled) on random features, so the ratio is pure implementation overhead/throughput.

Two pixel sources:
- ``--source memory``: a random ``[pixels, dim]`` tensor in RAM (pure matmul/optimizer throughput);
- ``--source store``: what ``bench run`` uses at paper scale: DDPM-shaped fp16 native maps of
  ``--images`` 256x256 images in a feature store on disk, sampled on demand (``StreamedPixels``).
  Here members trained one after another each pay for their own pixel gathering.

Examples:
    python benchmarks/bench_probe_batched.py --dim 2816 --steps 300
    python benchmarks/bench_probe_batched.py --source store --images 8 --noise-steps 3 --steps 200 --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.probe import TensorPixelSource, TrainConfig, train_ensemble, train_member


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["memory", "store"], default="memory")
    parser.add_argument("--images", type=int, default=8, help="--source store: training images (256x256)")
    parser.add_argument("--noise-steps", type=int, default=3, help="--source store: 3 -> 8448 channels")
    parser.add_argument("--dim", type=int, default=8448, help="--source memory: feature dimension (DDPM: 8448)")
    parser.add_argument("--pixels", type=int, default=8192, help="training pixels held in memory")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per member")
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--classes", type=int, default=15, help="K (K < 30 -> hidden 128/32)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternate the two sides this many times and keep each one's best time "
                             "(robust to other load on a shared machine)")
    return parser.parse_args()


def store_source(args: argparse.Namespace):
    """A StreamedPixels source over a synthetic feature store (kept in a temporary folder)."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    import numpy as np

    from bench.features import FeatureStore, StreamedPixels, build_pixel_index
    from bench_probe_memory import SIZE, prepare

    cache = Path(tempfile.mkdtemp(prefix="bench-batched-"))
    atexit.register(shutil.rmtree, cache, True)
    prepare(cache, args.images, args.noise_steps)
    store = FeatureStore(cache, {"backbone": "synthetic", "steps": args.noise_steps}, SIZE)
    labels = [np.load(cache / f"label{i}.npy") % args.classes for i in range(args.images)]
    return StreamedPixels(store, [f"img{i}" for i in range(args.images)], build_pixel_index(labels, 255))


def timed(fn):
    """(wall seconds, CPU seconds of this process, result); CPU time is the fairer CPU-side measure
    when other jobs share the cores, wall time the one that matters on a GPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - wall, time.process_time() - cpu), result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.source == "store":
        source = store_source(args)
    else:
        generator = torch.Generator().manual_seed(0)
        source = TensorPixelSource(
            torch.randn(args.pixels, args.dim, generator=generator),
            torch.randint(0, args.classes, (args.pixels,), generator=generator),
        )
    seeds = list(range(args.members))
    # Early stop off (patience > steps) so every member takes exactly `steps` steps on both sides.
    config = TrainConfig(members=args.members, max_steps=args.steps, max_epochs=10**9, patience=10**9)

    batched = sequential = (float("inf"), float("inf"))
    for _ in range(args.repeats):
        seconds, (_, infos) = timed(lambda: train_ensemble(
            source, args.classes, seeds=seeds, config=config, device=args.device, progress=False))
        batched = tuple(map(min, batched, seconds))
        seconds, seq_infos = timed(lambda: [
            train_member(source, args.classes, seed=s, config=config, device=args.device)[1] for s in seeds])
        sequential = tuple(map(min, sequential, seconds))

    assert [i["steps"] for i in infos] == [i["steps"] for i in seq_infos] == [args.steps] * args.members
    print(f"source={args.source} dim={source.dim} pixels={source.num_pixels} members={args.members} steps={args.steps} "
          f"threads={args.threads} device={args.device} best of {args.repeats}")
    print("                          wall s    cpu s")
    print(f"batched ensemble       : {batched[0]:8.2f} {batched[1]:8.2f}")
    print(f"members one at a time  : {sequential[0]:8.2f} {sequential[1]:8.2f}")
    print(f"speed-up (seq/batched) : {sequential[0] / batched[0]:7.2f}x {sequential[1] / batched[1]:7.2f}x")


if __name__ == "__main__":
    main()
