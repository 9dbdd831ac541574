"""Probe training per-step cost at demo size: the step loop before and after the per-step overhead work.

The demo (``bench run --backbone pixels,ddpm --random-controls --dataset demo``) trains 15 probes of
10 members on ~80,000 pixels (20 images of 64x64), 9 classes, batch 64: ~1,250 steps per epoch and
~6,250 steps per probe (early stop in epoch 4-5). At 5 features per pixel (``pixels``) a step is
tiny, so per-step overhead decides the run time; at 864 (``ddpm``) the matmuls and Adam weigh more.

"before" is a plain copy of the old ``train_ensemble`` loop (``train_ensemble_before`` below: a
background thread prefetching the next batch, ``optimizer.zero_grad``/``optimizer.step``, a
``tolist`` and the early-stop bookkeeping every step); "after" is ``bench.probe.train_ensemble``.
Both train the same members on the same synthetic features for ``--steps`` optimiser steps
(``TrainConfig(max_steps=...)``, early stop off), alternating ``--repeats`` times, and must end with
the same final weights and infos (exit status 1 otherwise). Two timings, both less sensitive to
other load on a shared machine than one run: the best whole run (wall and CPU seconds per step, epoch set-up included) and
the median of the individual steps' wall times over all repeats (a clock read after every step; for
"after" through the progress-bar hook, ``bench.probe._progress_bar``).

Examples:
    python benchmarks/bench_probe_small.py                        # dims 5 and 864, 1 and 2 threads
    python benchmarks/bench_probe_small.py --source tensor        # TensorPixelSource's index_select gather
    python benchmarks/bench_probe_small.py --dims 5 --threads 2 --steps 1000
    python benchmarks/bench_probe_small.py --min-epochs 0         # time the early-stop tracking path too
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

import bench.probe as probe
from bench.probe import (EarlyStopper, EnsembleMLP, TensorPixelSource, TrainConfig, _adam, _check_source,
                         _ensemble_forward, _new_info, train_ensemble)


# ---- "before": the old loop, kept as the reference ------------------------------------------------

class _ActiveMembersBefore:
    """Working copies of the still-training members (the old ``_ActiveMembers``)."""

    def __init__(self, ensemble, lr):
        self.ensemble, self.lr = ensemble, lr
        self.members = list(range(ensemble.members))
        self.params = {k: v.detach().clone().requires_grad_() for k, v in ensemble.named_parameters()}
        self.buffers = {k: v.clone() for k, v in ensemble.named_buffers()}
        self.optimizer = _adam(self.params.values(), lr)

    @torch.no_grad()
    def retire(self, rows):
        retired = [self.members[r] for r in rows]
        for name, value in [*self.params.items(), *self.buffers.items()]:
            getattr(self.ensemble, name)[retired] = value[rows]
        keep = [r for r in range(len(self.members)) if r not in rows]
        self.members = [self.members[r] for r in keep]
        if keep and rows:
            old_state = {name: self.optimizer.state[p] for name, p in self.params.items()}
            self.params = {k: v[keep].clone().requires_grad_() for k, v in self.params.items()}
            self.buffers = {k: v[keep].clone() for k, v in self.buffers.items()}
            self.optimizer = _adam(self.params.values(), self.lr)
            for name, param in self.params.items():
                state = old_state[name]
                self.optimizer.state[param] = {"step": state["step"].clone(),
                                               "exp_avg": state["exp_avg"][keep].clone(),
                                               "exp_avg_sq": state["exp_avg_sq"][keep].clone()}
        return keep


class _PrefetcherBefore:
    """The old loader: step s+1's pixels gathered in a background thread while step s trains."""

    def __init__(self, source, perms, batch, steps):
        self.source, self.perms, self.batch, self.steps = source, perms, batch, steps
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = self.pool.submit(self._load, 0, perms)

    def _load(self, step, perms):
        index = perms[:, step * self.batch:(step + 1) * self.batch].long()
        x = self.source.gather(index.reshape(-1)).to(torch.float32).view(index.shape[0], self.batch, -1)
        y = self.source.labels[index.reshape(-1)].view(index.shape[0], self.batch)
        return x, y

    def take(self, step):
        x, y = self.pending.result()
        if step + 1 < self.steps:
            self.pending = self.pool.submit(self._load, step + 1, self.perms)
        return x, y.reshape(-1)

    def keep_rows(self, keep):
        self.perms = self.perms[keep]
        pending = self.pending
        self.pending = self.pool.submit(lambda: tuple(t[keep] for t in pending.result()))

    def close(self):
        self.pool.shutdown(wait=True)


def train_ensemble_before(source, num_classes, *, seeds, config, clock=None):
    """The old ``train_ensemble`` on CPU for an in-memory source; ``clock.update(1)`` after each step."""
    _check_source(source, num_classes, config.batch_size)
    ensemble = EnsembleMLP(source.dim, num_classes, config.members, config.hidden, seeds)
    working = _ActiveMembersBefore(ensemble, config.lr)
    batch, n_pixels = config.batch_size, source.num_pixels
    steps_per_epoch = n_pixels // batch
    shufflers = [torch.Generator().manual_seed(int(s)) for s in seeds]
    stoppers = [EarlyStopper(config.min_epochs, config.patience) for _ in seeds]
    infos = [_new_info() for _ in seeds]
    budget = steps_per_epoch * config.max_epochs
    budget = min(budget, config.max_steps) if config.max_steps is not None else budget
    step_count = 0
    for epoch in range(config.max_epochs):
        if not working.members or step_count == budget:
            break
        perms = torch.stack([torch.randperm(n_pixels, generator=shufflers[m]).to(torch.int32)
                             for m in working.members])
        for m in working.members:
            infos[m]["epochs"] += 1
        loader = _PrefetcherBefore(source, perms, batch, steps_per_epoch)
        for step in range(steps_per_epoch):
            x, y = loader.take(step)
            n_active = x.shape[0]
            logits = _ensemble_forward(working.params, working.buffers, x, training=True)
            per_pixel = F.cross_entropy(logits.reshape(n_active * batch, -1), y, reduction="none")
            losses = per_pixel.view(n_active, batch).mean(dim=1)
            working.optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            working.optimizer.step()
            step_count += 1
            if clock is not None:
                clock.update(1)
            stopped = []
            for row, (member, loss) in enumerate(zip(working.members, losses.tolist())):
                infos[member]["steps"], infos[member]["final_loss"] = step_count, loss
                if stoppers[member].step(epoch, loss):
                    infos[member]["stop_epoch"] = epoch
                    stopped.append(row)
            if step_count == budget:
                break
            if stopped:
                keep = working.retire(stopped)
                if not working.members:
                    break
                loader.keep_rows(keep)
        loader.close()
    working.retire(list(range(len(working.members))))
    return ensemble.eval(), infos


class DenseLikeSource:
    """In-memory features gathered as ``bench.features.DensePixels`` does (``features[index]``, what
    the demo's runs use); ``--source tensor`` uses ``TensorPixelSource`` (``index_select``) instead."""

    def __init__(self, features, labels):
        self._feats, self.labels = features, labels
        self.num_pixels, self.dim = features.shape

    def gather(self, index):
        return self._feats[index]


def train_ensemble_after(source, num_classes, *, seeds, config, clock=None):
    if clock is None:
        return train_ensemble(source, num_classes, seeds=seeds, config=config, progress=False)
    original = probe._progress_bar
    probe._progress_bar = lambda total, enabled: clock  # its update(1) runs once per step
    try:
        return train_ensemble(source, num_classes, seeds=seeds, config=config, progress=False)
    finally:
        probe._progress_bar = original


class StepClock:
    """Records the wall time of every step (the subset of a progress bar the loops call)."""

    def __init__(self):
        self.times = [time.perf_counter()]

    def update(self, n=1):
        self.times.append(time.perf_counter())

    def reset(self, total=None):
        self.times.append(None)  # a new epoch: its set-up is not a step

    def set_description(self, desc):
        pass

    def close(self):
        pass

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:]) if a is not None and b is not None]


# ---- measurement ----------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="5,864", help="feature dims, comma-separated (pixels: 5, demo DDPM: 864)")
    parser.add_argument("--threads", default="1,2", help="torch CPU thread counts, comma-separated")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per run")
    parser.add_argument("--pixels", type=int, default=80_000, help="training pixels (demo: 20 images of 64x64)")
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--classes", type=int, default=9)
    parser.add_argument("--source", choices=["dense", "tensor"], default="dense",
                        help="dense: gather like DensePixels (features[index], the demo's source); "
                             "tensor: TensorPixelSource (index_select)")
    parser.add_argument("--min-epochs", type=int, default=4,
                        help="early stop's min_epochs (default 4: a run under 4 epochs tracks no losses; "
                             "0 times the per-step tracking path, with patience high enough never to stop)")
    parser.add_argument("--repeats", type=int, default=3, help="alternate before/after this many times, keep the best")
    return parser.parse_args()


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), result


def max_abs_difference(a: EnsembleMLP, b: EnsembleMLP) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def main() -> int:
    args = parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    seeds = list(range(args.members))
    config = TrainConfig(members=args.members, max_steps=args.steps, max_epochs=10**9,
                         min_epochs=args.min_epochs, patience=10**9)
    print(f"source={args.source} pixels={args.pixels} members={args.members} classes={args.classes} "
          f"batch={config.batch_size} steps={args.steps} min_epochs={args.min_epochs} repeats={args.repeats}\n"
          f"ms per optimiser step: wall and CPU of the best run, median wall time of a single step")
    print("              |        before        |        after         |  ratio before/after  |")
    print("  dim threads |   wall    cpu median |   wall    cpu median |   wall   cpu median | final weights")
    all_same = True
    for dim in dims:
        generator = torch.Generator().manual_seed(0)
        source = (DenseLikeSource if args.source == "dense" else TensorPixelSource)(
            torch.randn(args.pixels, dim, generator=generator),
            torch.randint(0, args.classes, (args.pixels,), generator=generator))
        for threads in thread_counts:
            torch.set_num_threads(threads)
            warm = TrainConfig(members=args.members, max_steps=20)
            for fn in (train_ensemble_before, train_ensemble_after):
                fn(source, args.classes, seeds=seeds, config=warm)
            best = {"before": (float("inf"),) * 2, "after": (float("inf"),) * 2}
            steps = {"before": [], "after": []}
            results = {}
            for _ in range(args.repeats):
                for name, fn in (("before", train_ensemble_before), ("after", train_ensemble_after)):
                    clock = StepClock()
                    seconds, results[name] = timed(
                        lambda: fn(source, args.classes, seeds=seeds, config=config, clock=clock))
                    best[name] = tuple(map(min, best[name], seconds))
                    steps[name] += clock.steps()
            (ens_b, info_b), (ens_a, info_a) = results["before"], results["after"]
            assert [i["steps"] for i in info_a] == [args.steps] * args.members
            diff = max_abs_difference(ens_b, ens_a)
            same = diff == 0.0 and info_a == info_b
            all_same &= same
            verdict = "bit-identical" if same else f"DIFFER: max abs {diff:.3g}, infos equal: {info_a == info_b}"
            (bw, bc), (aw, ac) = (tuple(v / args.steps * 1e3 for v in best[k]) for k in ("before", "after"))
            bm, am = (statistics.median(steps[k]) * 1e3 for k in ("before", "after"))
            print(f"{dim:5d} {threads:7d} | {bw:6.2f} {bc:6.2f} {bm:6.2f} | {aw:6.2f} {ac:6.2f} {am:6.2f} | "
                  f"{bw / aw:6.2f}x {bc / ac:5.2f}x {bm / am:5.2f}x | {verdict}", flush=True)
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
