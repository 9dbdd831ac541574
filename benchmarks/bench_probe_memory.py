"""Probe-stage peak memory vs the number of training images, next to the official dense matrix.

For each N, a fresh process runs the probe stage exactly as ``bench run`` does on a cache of native
DDPM-shaped maps (256 x 256 images; per noise step 1024@32, 512@32, 512@32, 512@64, 256@128 = 2816
channels): build the training pixel index, stream pixels from the fp16 maps, train the 10-member
ensemble for a fixed number of steps, predict one test image in chunks. It prints the process's peak
RSS next to the size of the float32 ``[N, C, 256, 256]`` tensor the official code allocates for the
same run (about twice that at its peak).

    python benchmarks/bench_probe_memory.py --images 4,8,16 --noise-steps 1 --train-steps 200

The maps are random (the memory does not depend on the values); the cache is written once per N
into a temporary folder and deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCKS = [(1024, 32), (512, 32), (512, 32), (512, 64), (256, 128)]  # (channels, native size) per step
SIZE = 256
CLASSES = 15


def prepare(cache: Path, n_images: int, noise_steps: int) -> None:
    """Write N training + 1 test image of random fp16 maps and random blob labels."""
    import numpy as np
    import torch

    from bench.features import FeatureStore

    store = FeatureStore(cache, {"backbone": "synthetic", "steps": noise_steps}, SIZE)
    g = torch.Generator().manual_seed(0)
    for i in range(n_images + 1):
        maps = [torch.randn(c, h, h, generator=g).half() for _ in range(noise_steps) for c, h in BLOCKS]
        store.put(f"img{i}", maps)
        coarse = np.random.default_rng(i).integers(0, CLASSES, (8, 8))
        np.save(cache / f"label{i}.npy", np.kron(coarse, np.ones((32, 32), dtype=np.int64)))


def probe_stage(cache: Path, n_images: int, noise_steps: int, train_steps: int, threads: int,
                max_memory_gb: float) -> dict:
    """The probe stage of a run, measured in this (fresh) process."""
    import numpy as np
    import torch

    from bench import features, probe
    from bench.results import peak_rss_bytes

    torch.set_num_threads(threads)
    baseline = peak_rss_bytes()
    store = features.FeatureStore(cache, {"backbone": "synthetic", "steps": noise_steps}, SIZE)
    ids = [f"img{i}" for i in range(n_images)]
    labels = [np.load(cache / f"label{i}.npy") for i in range(n_images)]
    index = features.build_pixel_index(labels, ignore_label=255)
    source = features.StreamedPixels(store, ids, index, max_resident_bytes=int(max_memory_gb * 2**30) // 4)
    t0 = time.time()
    config = probe.TrainConfig(max_steps=train_steps)
    ensemble, _ = probe.train_ensemble(source, CLASSES, seeds=list(range(10)), config=config, progress=False)
    train_s = time.time() - t0
    maps = store.load(f"img{n_images}")
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    t0 = time.time()
    probe.predict_chunked(ensemble, lambda sl: features.sample_maps(maps, ys[sl], xs[sl], SIZE), SIZE * SIZE,
                          chunk=8192)
    return {
        "images": n_images, "channels": source.dim, "train_pixels": source.num_pixels,
        "peak_rss": peak_rss_bytes(), "import_rss": baseline, "train_s": train_s, "predict_s": time.time() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="4,8,16", help="comma list of training-image counts")
    parser.add_argument("--noise-steps", type=int, default=1, help="1 -> 2816 channels, 3 -> 8448 (the paper's)")
    parser.add_argument("--train-steps", type=int, default=200, help="optimiser steps per member")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-memory", type=float, default=4.0, help="GiB, as bench run --max-memory")
    parser.add_argument("--_measure", nargs=2, metavar=("CACHE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        cache, n = Path(args._measure[0]), int(args._measure[1])
        print(json.dumps(probe_stage(cache, n, args.noise_steps, args.train_steps, args.threads, args.max_memory)))
        return

    rows = []
    for n in [int(v) for v in args.images.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
            prepare(Path(tmp), n, args.noise_steps)
            out = subprocess.run(
                [sys.executable, __file__, "--noise-steps", str(args.noise_steps), "--train-steps",
                 str(args.train_steps), "--threads", str(args.threads), "--max-memory", str(args.max_memory),
                 "--_measure", tmp, str(n)],
                check=True, capture_output=True, text=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    gb = 1e9
    print(f"{'images':>6} {'channels':>8} {'train px':>9} {'peak RSS':>9} {'official dense fp32':>20} "
          f"{'official peak (~2x)':>20} {'train s':>8} {'predict s':>9}")
    for r in rows:
        dense = r["images"] * r["channels"] * SIZE * SIZE * 4
        print(f"{r['images']:6d} {r['channels']:8d} {r['train_pixels']:9d} {r['peak_rss'] / gb:8.2f}G "
              f"{dense / gb:19.1f}G {2 * dense / gb:19.1f}G {r['train_s']:8.1f} {r['predict_s']:9.1f}")
    print("peak RSS: the whole measuring process (python + torch + the probe stage); "
          f"python + torch alone: {rows[0]['import_rss'] / gb:.2f}G")


if __name__ == "__main__":
    main()
