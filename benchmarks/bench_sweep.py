"""The block x step sweep's cost: one extraction + B x S probes, against B x S runs that each extract.

"sweep" is what ``bench analyze sweep`` does (``bench.analyses._common``): plan one run with every
block at every step, extract every image's maps ONCE into a fresh feature cache, then train and score
one probe per (block, step) on that single cached map. "separate" is what a user would otherwise run:
``bench run --set blocks=B --set steps=T`` for every cell, each planning its run and extracting its
own features (into its own fresh cache) before the same probe. Both sides use the same images, seeds
and probe settings (``--members``, ``--max-steps``: small by default so that the extraction share is
visible; the probe part is the same work on both sides), alternate ``--repeats`` times, and count the
images that go through the backbone's forward pass.

Examples:
    python benchmarks/bench_sweep.py                                   # demo, 5 blocks x 3 steps, 40 images
    python benchmarks/bench_sweep.py --blocks 6,8 --steps 50 --members 10 --max-steps 0   # official probes
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.analyses import _common
from bench.runner import RunSpec


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _count_forward() -> list[int]:
    """Patch the DDPM forward to count the images it sees (cache misses only reach it)."""
    from backbones.ddpm import DDPM

    seen: list[int] = []
    original = DDPM.forward_features

    def counting(self, x):
        seen.append(int(x.shape[0]))
        return original(self, x)

    DDPM.forward_features = counting
    return seen


def _probe(prep, store, overrides: dict) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    trained = _common.train_probe(prep, store, overrides, progress=False)
    t1 = time.perf_counter()
    miou = _common.evaluate(prep, trained, store)["miou"]["official"]
    return t1 - t0, time.perf_counter() - t1, miou


def sweep_side(args, cache: Path, overrides: dict) -> dict:
    t0 = time.perf_counter()
    prep = _common.prepare(RunSpec(args.backbone, args.dataset, seed=args.seed, progress=False, cache=cache,
                                   max_train=args.max_train, max_test=args.max_test, members=args.members,
                                   backbone_kwargs={"blocks": args.blocks, "steps": args.steps}))
    plan_s = time.perf_counter() - t0 - prep.seconds
    train = predict = 0.0
    mious = {}
    for t in args.steps:
        for b in args.blocks:
            view = _common.select_maps(prep.store, _common.map_indices(prep.feature_names, [f"t{t}.b{b}"]))
            tr, pr, mious[b, t] = _probe(prep, view, overrides)
            train, predict = train + tr, predict + pr
    return {"plan": plan_s, "extract": prep.seconds, "train": train, "predict": predict,
            "total": time.perf_counter() - t0, "miou": mious}


def separate_side(args, cache: Path, overrides: dict) -> dict:
    t0 = time.perf_counter()
    plan_s = extract = train = predict = 0.0
    mious = {}
    for t in args.steps:
        for b in args.blocks:
            t1 = time.perf_counter()
            prep = _common.prepare(RunSpec(args.backbone, args.dataset, seed=args.seed, progress=False,
                                           cache=cache / f"t{t}.b{b}", max_train=args.max_train,
                                           max_test=args.max_test, members=args.members,
                                           backbone_kwargs={"blocks": [b], "steps": [t]}))
            plan_s += time.perf_counter() - t1 - prep.seconds
            extract += prep.seconds
            tr, pr, mious[b, t] = _probe(prep, None, overrides)
            train, predict = train + tr, predict + pr
    return {"plan": plan_s, "extract": extract, "train": train, "predict": predict,
            "total": time.perf_counter() - t0, "miou": mious}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="ddpm")
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--blocks", type=_ints, default=[5, 6, 7, 8, 12])
    ap.add_argument("--steps", type=_ints, default=[50, 150, 250])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=200, help="0: the official early stop only")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {"members": args.members, "max_steps": args.max_steps or None}
    seen = _count_forward()
    cells = len(args.blocks) * len(args.steps)
    results: dict[str, list[dict]] = {"sweep": [], "separate": []}
    # warm-up, not timed: the first probe of a process pays one-time costs (kernel selection, allocator)
    warm = argparse.Namespace(**{**vars(args), "blocks": args.blocks[:1], "steps": args.steps[:1]})
    with tempfile.TemporaryDirectory() as tmp:
        sweep_side(warm, Path(tmp), overrides)
    images = {}
    for r in range(args.repeats):
        order = ("sweep", "separate") if r % 2 == 0 else ("separate", "sweep")
        for side in order:
            seen.clear()
            with tempfile.TemporaryDirectory() as tmp:  # a fresh cache: both sides really extract
                fn = sweep_side if side == "sweep" else separate_side
                results[side].append(fn(args, Path(tmp), overrides))
            images[side] = sum(seen)
            res = results[side][-1]
            print(f"repeat {r} {side:8}: total {res['total']:.1f} s (plan {res['plan']:.1f}, extract {res['extract']:.1f}, "
                  f"probes {res['train']:.1f} + predict {res['predict']:.1f}); {sum(seen)} images through the forward",
                  file=sys.stderr, flush=True)

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    diffs = [abs(results["sweep"][0]["miou"][c] - results["separate"][0]["miou"][c]) for c in results["sweep"][0]["miou"]]
    print(f"\n{args.backbone} on {args.dataset}: {len(args.blocks)} blocks x {len(args.steps)} steps = {cells} cells; "
          f"probe {args.members} members, max_steps {args.max_steps or 'none'}; median of {args.repeats} alternating repeats")
    print("| | sweep (1 extraction + B x S probes) | separate (B x S runs, each extracting) | ratio |")
    print("|---|---|---|---|")
    print(f"| images through the backbone | {images['sweep']} | {images['separate']} | {images['separate'] / max(1, images['sweep']):.1f}x |")
    for key, name in (("plan", "plan (data check, model build)"), ("extract", "feature extraction"),
                      ("train", "probe training"), ("predict", "prediction + scoring"), ("total", "**total**")):
        a, b = med("sweep", key), med("separate", key)
        print(f"| {name} | {a:.1f} s | {b:.1f} s | {b / a:.2f}x |" if a > 0 else f"| {name} | {a:.1f} s | {b:.1f} s | – |")
    print(f"\nper-cell probe (sweep side): {med('sweep', 'train') / cells:.2f} s train, "
          f"{med('sweep', 'predict') / cells:.2f} s predict; one extraction {med('sweep', 'extract'):.1f} s vs "
          f"{med('separate', 'extract') / cells:.2f} s per single-map extraction")
    print(f"max |mIoU sweep - separate| over cells: {100 * max(diffs):.2f} points (fp16 cache: maps equal up to "
          f"batched-conv rounding)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
