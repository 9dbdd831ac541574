"""Synthetic-set throughput and memory: ours (shards) against the official script's approach.

The official DatasetDDPM script samples a whole invocation's images, labels each one from its full
upsampled feature matrix ``[C, H*W]``, keeps images, labels and scores in Python lists and saves one
``.npz`` at the end: memory grows with N (13.1 GB for a 50K set at 256 px). Ours writes
content-addressed shards of ``--shard-size`` samples and labels each image in memory-bounded chunks,
so memory is flat in N.

Each (approach, N) runs in a fresh process (peak RSS = the kernel's VmHWM of that process). Both use
the same generator, sampler, interpreter (trained once, then copied) and seeds. The labelling rates
are printed separately from sampling, since sampling is the same model call in both.

    python benchmarks/bench_synth.py --sizes 1000,10000 --sample-steps 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _spec(root: Path, num: int, args: argparse.Namespace):
    from baselines.synth import SynthSpec

    return SynthSpec("datasetddpm", "demo", num=num, backbone="ddpm.demo", sampler="ddim",
                     sample_steps=args.sample_steps, shard_size=args.shard_size, batch_size=args.batch_size,
                     root=root / "synth", cache=root / "features", progress=False)


def child_ours(root: Path, num: int, args: argparse.Namespace) -> dict:
    from baselines.synth import synthesize

    t = time.perf_counter()
    s = synthesize(_spec(root, num, args))
    return {"seconds": time.perf_counter() - t, **s.timing, "peak_rss_mb": _vm_hwm_mb()}


def child_official(root: Path, num: int, args: argparse.Namespace) -> dict:
    """The official approach, written plainly: everything in lists, one .npz at the end."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from baselines.sources import DDPMSource
    from baselines.synth import _load_interpreter, set_folder

    spec = _spec(root, num, args)
    source = DDPMSource(spec)
    _, _, folder = set_folder(spec, source)
    ensemble = _load_interpreter(folder / "interpreter.safetensors", source.member_seeds())
    timing = {"generate_s": 0.0, "label_s": 0.0, "write_s": 0.0}
    images, labels, scores = [], [], []
    t0 = time.perf_counter()
    for start in range(0, num, args.batch_size):
        g = torch.Generator().manual_seed(start)
        t = time.perf_counter()
        x, maps = source.generate(min(args.batch_size, num - start), g)
        timing["generate_s"] += time.perf_counter() - t
        t = time.perf_counter()
        size = x.shape[-1]
        for b in range(x.shape[0]):
            # the whole upsampled feature matrix of the image, as the official collect step builds it
            feats = torch.cat([F.interpolate(m[b:b + 1].float(), size=size, mode="bilinear") for m in maps], 1)
            feats = feats[0].reshape(feats.shape[1], -1).t()  # [H*W, C]
            with torch.no_grad():
                probs = torch.stack([torch.softmax(ensemble.member(i)(feats), -1) for i in range(ensemble.members)])
            votes = probs.argmax(-1)
            label = torch.mode(votes, 0).values.reshape(size, size)
            mean = probs.mean(0)
            js = -(mean * mean.clamp_min(1e-12).log()).sum(-1) + (probs * probs.clamp_min(1e-12).log()).sum(-1).mean(0)
            k = js.numel() // 10
            scores.append(float(js.topk(k).values.mean()))
            images.append(((x[b] + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
            labels.append(label.to(torch.uint8).numpy())
        timing["label_s"] += time.perf_counter() - t
    t = time.perf_counter()
    np.savez(root / "samples.npz", np.stack(images), np.stack(labels), np.asarray(scores, np.float32))
    timing["write_s"] = time.perf_counter() - t
    return {"seconds": time.perf_counter() - t0, **timing, "samples": num, "peak_rss_mb": _vm_hwm_mb()}


def _run_child(kind: str, root: Path, num: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--root", str(root), "--num", str(num),
           "--sample-steps", str(args.sample_steps), "--shard-size", str(args.shard_size),
           "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{kind} {num} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--sample-steps", type=int, default=2, help="DDIM steps (the cost of sampling, same for both)")
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--child")
    ap.add_argument("--root")
    ap.add_argument("--num", type=int)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.child:
        fn = child_ours if args.child == "ours" else child_official
        print(json.dumps(fn(Path(args.root), args.num, args)))
        return
    base = Path(tempfile.mkdtemp(prefix="bench_synth_"))
    os.environ["BENCH_HOME"] = str(base / "home")
    warm = base / "warm"  # trains the interpreter once (and caches the demo's features)
    print(f"warm-up (interpreter): {_run_child('ours', warm, args.shard_size, args)['seconds']:.0f} s", flush=True)
    rows = []
    for num in [int(s) for s in args.sizes.split(",")]:
        for kind in ("official", "ours"):
            root = base / f"{kind}{num}"
            shutil.copytree(warm / "features", root / "features")
            for set_dir in (warm / "synth").iterdir():  # the interpreter and identity, no shards
                (root / "synth" / set_dir.name).mkdir(parents=True)
                for name in ("set.json", "interpreter.safetensors"):
                    shutil.copy2(set_dir / name, root / "synth" / set_dir.name / name)
            r = _run_child(kind, root, num, args)
            n = r["samples"]
            rows.append((kind, num, n / r["seconds"], n / r["generate_s"], n / max(r["label_s"], 1e-9),
                         r["peak_rss_mb"]))
            print(f"{kind:8s} N={num:6d}: {rows[-1][2]:6.1f} img/s overall, sampling {rows[-1][3]:6.1f} img/s, "
                  f"labelling {rows[-1][4]:6.1f} img/s, peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
            shutil.rmtree(root)
    print("\n| approach | N | img/s overall | sampling img/s | labelling img/s | peak RSS |")
    print("|---|---|---|---|---|---|")
    for kind, num, a, b, c, m in rows:
        print(f"| {kind} | {num} | {a:.1f} | {b:.1f} | {c:.1f} | {m:.0f} MB |")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
