"""DDPM feature extraction: our early-exit, timestep-batched forward vs the official approach.

Reference (what the official extractor does): for each noise step, one full UNet forward (every
decoder block and the output head) with forward hooks on the requested output blocks. Ours:
``DDPM.forward_features``: all steps in one batch, stopping after the deepest requested block.
Both run the same random-init model on the same images and noise, in the same process; the script
checks that the outputs are identical and prints the times and their ratio.

    python benchmarks/bench_ddpm_extract.py --arch demo --images 8
    python benchmarks/bench_ddpm_extract.py --arch lsun --images 1 --repeats 1   # the paper's 256 px model
"""
from __future__ import annotations

import argparse
import time

import torch

import bench
from backbones._diffusion import q_sample


def reference_features(bb, x: torch.Tensor) -> list[torch.Tensor]:
    """One full forward per step with hooks, as the official extractor: step-major, block ascending."""
    captured: list[torch.Tensor] = []
    hooks = [bb.model.output_blocks[b].register_forward_hook(lambda m, i, o: captured.append(o.float()))
             for b in bb.blocks]
    try:
        with torch.no_grad():
            for t in bb.steps:
                xt = q_sample(x, t, bb.noise, bb._alphas_cumprod)
                bb.model(xt, torch.tensor([t], dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    return captured


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["demo", "lsun"], default="demo", help="demo: 64 px; lsun: the paper's 256 px")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = "ddpm.demo" if args.arch == "demo" else "ddpm.lsun_bedroom"
    bb = bench.create_backbone(name, pretrained=False, seed=0)  # paper blocks 5,6,7,8,12 and steps 50,150,250
    size = bb.input_size
    images = torch.randint(0, 256, (args.images, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = bb.preprocess(images)

    # Warm-up: the first call of a shape pays for kernel selection and allocation; not what we measure.
    reference_features(bb, x[:1])
    bb.forward_features(x[:1])
    # Per image, as the official pipeline feeds them (batch 1).
    ref_s, ref = best_time(lambda: [reference_features(bb, x[i:i + 1]) for i in range(len(x))], args.repeats)
    ours_s, ours = best_time(lambda: [bb.forward_features(x[i:i + 1]) for i in range(len(x))], args.repeats)
    worst = max((a - b).abs().max().item() for r, o in zip(ref, ours) for a, b in zip(r, o))
    print(f"model {name} ({size} px), {args.images} image(s), blocks {list(bb.blocks)}, steps {list(bb.steps)}, "
          f"{bb.num_features} channels, {args.threads} thread(s)")
    print(f"reference (full forward per step, hooks): {ref_s:8.2f} s")
    print(f"ours (early exit, steps batched):         {ours_s:8.2f} s")
    print(f"speed ratio: {ref_s / ours_s:.2f}x   max |difference|: {worst:.2e}")


if __name__ == "__main__":
    main()
