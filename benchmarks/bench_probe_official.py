"""The probe against an official-style training loop, same pixels, same steps, one thread (issue 12).

"official" is written out plainly below, the way the official code trains its ensemble (spec §5):
for each of the 10 members in turn, an ``nn.Sequential`` (Linear -> ReLU -> BatchNorm1d -> Linear ->
ReLU -> BatchNorm1d -> Linear, hidden 128, 32), weights N(0, 0.02), ``torch.optim.Adam(lr=1e-3)``
(torch's default implementation for CPU tensors), a ``DataLoader(TensorDataset(features, labels),
batch_size=64, shuffle=True, drop_last=True)`` over the float32 features in RAM (the official code
holds float32), cross-entropy, ``--steps`` optimiser steps. "ours" is ``bench.probe.train_ensemble``
on the same features as an fp16 ``TensorPixelSource`` (the cache's precision), 10 members x ``--steps``
steps (``TrainConfig(max_steps=...)``; the steps fall in epoch 0, before the early stop tracks
anything), once per precision mode. The sides alternate within each repeat (the order rotates), so
every ratio compares runs made seconds apart on the same, shared machine; the median ratio is printed.

The data are learnable: ``--classes`` Gaussian blobs in ``--dim`` dimensions rounded to fp16; every
side's final loss (mean over members of each one's last mini-batch loss) is printed, so a side that
did not train would show (the loss starts at ln 9 = 2.2).

Examples:
    python benchmarks/bench_probe_official.py                          # 40k pixels x 8448, 60 steps, 3 repeats
    python benchmarks/bench_probe_official.py --steps 100 --repeats 5 --modes fp32,bf16
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.probe import TensorPixelSource, TrainConfig, train_ensemble


def make_data(pixels: int, dim: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 features ``[pixels, dim]`` (class centre + unit noise) and int64 labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 0.3
    labels = torch.randint(0, classes, (pixels,), generator=g)
    feats = torch.empty(pixels, dim, dtype=torch.float16)
    for start in range(0, pixels, 4096):  # in slices: no float32 [pixels, dim] temporary
        part = labels[start:start + 4096]
        feats[start:start + 4096] = centres[part] + torch.randn(len(part), dim, generator=g)
    return feats, labels


# ---- the official-style loop, written plainly ---------------------------------------------------

def official_member(dim: int, classes: int) -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(dim, 128), nn.ReLU(), nn.BatchNorm1d(128),
        nn.Linear(128, 32), nn.ReLU(), nn.BatchNorm1d(32),
        nn.Linear(32, classes),
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            nn.init.zeros_(layer.bias)
    return model


def train_official(features: torch.Tensor, labels: torch.Tensor, classes: int, members: int,
                   steps: int) -> list[float]:
    """Members one after another, each with its own DataLoader and Adam; returns every step's loss."""
    losses = []
    for member in range(members):
        torch.manual_seed(member)
        model = official_member(features.shape[1], classes).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = DataLoader(TensorDataset(features, labels), batch_size=64, shuffle=True, drop_last=True)
        for step, (x, y) in enumerate(loader):
            if step == steps:
                break
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


# ---- ours ------------------------------------------------------------------------------------------

def train_ours(source: TensorPixelSource, classes: int, members: int, steps: int, precision: str) -> list[float]:
    """``train_ensemble``; returns the members' final losses (it records no per-step history)."""
    config = TrainConfig(members=members, max_steps=steps, precision=precision)
    _, infos = train_ensemble(source, classes, seeds=list(range(members)), config=config, progress=False)
    assert all(info["steps"] == steps for info in infos), infos
    return [info["final_loss"] for info in infos]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixels", type=int, default=40_000)
    parser.add_argument("--dim", type=int, default=8448)
    parser.add_argument("--classes", type=int, default=9)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="fp32,bf16", help="precision modes of ours, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")

    feats, labels = make_data(args.pixels, args.dim, args.classes)
    feats32 = feats.float()  # what the official code holds: the same values in float32
    source = TensorPixelSource(feats, labels)
    print(f"{args.pixels} pixels x {args.dim} features, {args.classes} classes, {args.members} members x "
          f"{args.steps} steps, batch 64, {args.threads} thread(s), torch {torch.__version__}")

    sides = ["official", *modes]
    # warm-up: first calls pay one-off costs (allocator, oneDNN kernel selection)
    train_official(feats32, labels, args.classes, 1, 3)
    for mode in modes:
        train_ours(source, args.classes, args.members, 3, mode)
    times: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    ratios: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu_ratios: dict[str, list[float]] = {mode: [] for mode in modes}
    final: dict[str, float] = {}
    for repeat in range(args.repeats):
        order = sides[repeat % len(sides):] + sides[:repeat % len(sides)]
        seconds, cpu_seconds = {}, {}
        for side in order:
            t0, c0 = time.perf_counter(), time.process_time()
            if side == "official":
                losses = train_official(feats32, labels, args.classes, args.members, args.steps)
                final[side] = statistics.mean(losses[args.steps - 1::args.steps])  # each member's last loss
            else:
                final[side] = statistics.mean(train_ours(source, args.classes, args.members, args.steps, side))
            seconds[side], cpu_seconds[side] = time.perf_counter() - t0, time.process_time() - c0
            times[side].append(seconds[side])
            cpu[side].append(cpu_seconds[side])
        for mode in modes:
            ratios[mode].append(seconds["official"] / seconds[mode])
            cpu_ratios[mode].append(cpu_seconds["official"] / cpu_seconds[mode])
        print(f"repeat {repeat}: " + ", ".join(f"{side} {seconds[side]:.2f} s (CPU {cpu_seconds[side]:.2f} s)"
                                               for side in sides), flush=True)

    # CPU time: what the side itself computed; on a machine shared with other jobs it moves less
    # than wall time, which also counts the time the scheduler gave to others
    print("\nside      wall s  ms/step  ratio (wall, median; repeats)          CPU s  ratio (CPU, median)  final loss")
    for side in sides:
        wall, cpu_s = statistics.median(times[side]), statistics.median(cpu[side])
        if side == "official":
            ratio, cpu_ratio = "1.00x", "1.00x"
        else:
            ratio = f"{statistics.median(ratios[side]):.2f}x ({', '.join(f'{r:.2f}' for r in ratios[side])})"
            cpu_ratio = f"{statistics.median(cpu_ratios[side]):.2f}x"
        print(f"{side:9s} {wall:6.2f}  {wall / args.steps * 1e3:7.1f}  {ratio:37s} {cpu_s:6.2f}  {cpu_ratio:19s} "
              f"{final[side]:.3f}")


if __name__ == "__main__":
    main()
