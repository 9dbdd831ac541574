"""The pixel probe (spec §5, §6): an ensemble of small MLPs, trained together as one batched model.

The members are stored as stacked parameters ``[M, ...]`` (:mod:`bench.probe_model`) so one
``baddbmm`` runs a layer for all of them; each member still reads its own shuffled pixel stream and
has its own early stop, exactly as if it were trained alone (:func:`train_member` is that one-member
reference, and a test proves both give the same weights).

Pixels come from a :class:`PixelSource` one batch at a time (:mod:`bench.probe_data`), so the probe
never sees the full ``[N*H*W, d]`` matrix that makes the official code need ~177 GB for Bedroom-28.
The first layer can run in bf16/fp16 (``TrainConfig.precision``, :mod:`bench.probe_precision`);
float32 is the reference. Prediction, voting and uncertainty are in :mod:`bench.probe_predict`.

Seeds: member m uses ``seeds[m]`` twice, in two independent ``torch.Generator`` objects: one draws its
initial weights (layer by layer, ``[out, in]`` order like ``nn.Linear.weight``), the other its
per-epoch ``randperm``. The caller derives ``seeds`` from the run seed (spec §8.3).
"""
from __future__ import annotations

import math
import os  # noqa: F401  (bench.probe.os: tests patch os.sched_getaffinity through it)
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import BenchError
from bench.probe_data import (PREFETCH_MIN_BYTES, PixelSource, TensorPixelSource, _InlineLoader,  # noqa: F401
                              _prefetch_batches, _Prefetcher)
from bench.probe_model import (BN_EPS, BN_MOMENTUM, INIT_STD, EnsembleMLP, _batch_norm,  # noqa: F401
                               _draw_linear_weights, _empty_member, _ensemble_forward, _ensemble_tail,
                               _init_member, _layer_sizes, mlp_hidden_sizes)
from bench.probe_precision import LowPrecisionFirstLayer, compute_dtype, resolve_precision
from bench.probe_predict import image_uncertainty, js_uncertainty, majority_vote, predict_chunked  # noqa: F401

# ---- training --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Probe optimisation settings; defaults are the official ones (spec §5.4).

    ``max_steps`` (not in the official protocol) caps the optimiser steps, for benchmarks.

    Example:
        >>> TrainConfig(members=3).batch_size
        64
    """

    members: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    max_epochs: int = 100
    min_epochs: int = 4
    patience: int = 50
    hidden: tuple[int, int] | None = None
    max_steps: int | None = None
    #: the first layer's GEMM precision: fp32 (reference), bf16, fp16 (CUDA), or auto
    #: (:func:`bench.probe_precision.resolve_precision`); see :mod:`bench.probe_precision`
    precision: str = "fp32"


def config_key_parts(config: TrainConfig) -> dict:
    """``config`` as the dict a run key holds: every field, but ``precision`` only when it is not fp32.

    fp32 is the computation every result had before the precision modes existed (bit-identical), so
    its keys stay as they were and those results stay valid; any other mode enters the key.

    Example:
        >>> "precision" in config_key_parts(TrainConfig()), config_key_parts(TrainConfig(precision="bf16"))["precision"]
        (False, 'bf16')
    """
    from dataclasses import asdict

    parts = asdict(config)
    if parts.get("precision") == "fp32":
        del parts["precision"]
    return parts


class EarlyStopper:
    """The official early-stop rule for one member (spec §5.4); ``step`` returns True to stop now.

    Epochs before ``min_epochs`` are not tracked. From then on, after every step: a loss strictly
    below the best resets the counter, anything else (ties included) increments it, and the member
    stops when the counter exceeds ``patience``, i.e. on the 51st non-improving batch.

    Example:
        >>> stopper = EarlyStopper()
        >>> [stopper.step(epoch=4, loss=1.0) for _ in range(52)][-2:]
        [False, True]
    """

    def __init__(self, min_epochs: int = 4, patience: int = 50) -> None:
        self.min_epochs, self.patience = min_epochs, patience
        self.best_loss = 1e7  # the official initial value
        self.counter = 0

    def step(self, epoch: int, loss: float) -> bool:
        """Record the loss of one optimiser step in ``epoch``; True means stop this member now."""
        if epoch < self.min_epochs:
            return False
        if loss < self.best_loss:
            self.best_loss, self.counter = loss, 0
        else:
            self.counter += 1
        return self.counter > self.patience


def _adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam with the official settings (default betas/eps, no weight decay).

    The fused kernel does the whole update in one pass (about 8x faster than the default loop on
    CPU, a third of a step's time otherwise); same algorithm, rounding-level differences only.
    Both training paths use this, so they stay comparable.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # device or torch version without a fused Adam
        return torch.optim.Adam(params, lr=lr)


def _check_source(source: PixelSource, num_classes: int, batch_size: int) -> None:
    if batch_size < 2:
        raise BenchError(f"batch_size must be >= 2 for BatchNorm, got {batch_size}")
    if source.num_pixels < batch_size:
        raise BenchError(f"the training set has {source.num_pixels} pixels, fewer than one batch of {batch_size}")
    labels = source.labels
    if labels.numel() != source.num_pixels:
        raise BenchError(f"source.labels has {labels.numel()} entries for {source.num_pixels} pixels")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise BenchError(f"training label {low if low < 0 else high} outside 0..{num_classes - 1}")


def _new_info() -> dict:
    return {"steps": 0, "epochs": 0, "stop_epoch": None, "final_loss": float("nan")}


def _progress_bar(total: int, enabled: bool):
    from bench.progress import progress

    # One bar per epoch: the early stop usually ends training in epoch 4 of 100, so a bar over all
    # epochs would show a meaningless ETA. Off a terminal this prints a status line every 30 s.
    return progress(total=total, desc="probe", unit="step", enabled=enabled, leave=False)


class _ActiveMembers:
    """Working copies of the still-training members: stacked parameters, BN buffers, Adam state.

    Adam is elementwise, so one Adam over the stacked tensors is exactly M independent Adams: the
    loss is a sum of per-member terms over disjoint parameters, so each member's slice sees only its
    own gradient, and all active members share the same step count. A stopping member is retired:
    its rows are written back to the ensemble (a snapshot nothing touches again; left in the working
    set, Adam's momentum would keep moving it) and dropped from the working set, so later steps
    compute, gather pixels and update only for the members still training.

    With a low-precision ``precision`` the first layer's weight is outside autograd: its GEMMs run in
    :class:`~bench.probe_precision.LowPrecisionFirstLayer`, whose float32 gradient buffer is that
    weight's ``.grad``, and the same Adam updates its float32 master.
    """

    def __init__(self, ensemble: EnsembleMLP, lr: float, precision: str = "fp32") -> None:
        self.ensemble, self.lr = ensemble, lr
        self.members = list(range(ensemble.members))  # ensemble index of each working row
        self.params = {k: v.detach().clone().requires_grad_() for k, v in ensemble.named_parameters()}
        self.buffers = {k: v.clone() for k, v in ensemble.named_buffers()}
        self.dtype = compute_dtype(precision)  # the batches' dtype
        self.first: LowPrecisionFirstLayer | None = None
        if self.dtype != torch.float32:
            self.first = LowPrecisionFirstLayer(self.params["linear1_weight"], self.dtype)
            self.params["linear1_weight"].grad = self.first.grad
        self.optimizer = _adam(self.params.values(), lr)
        self._fused: tuple | None = None  # the direct fused-Adam call's arguments, see `step`

    def forward(self, x: Tensor) -> Tensor:
        """Training-mode logits ``[A, B, K]`` of the working members for ``x [A, B, d]`` (in ``self.dtype``)."""
        if self.first is None:
            return _ensemble_forward(self.params, self.buffers, x, training=True)
        h = (self.first.forward(x) + self.params["linear1_bias"]).relu()
        return _ensemble_tail(self.params, self.buffers, h, training=True)

    def zero_grad(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)`` without its per-call bookkeeping.

        A low-precision first layer's weight keeps its gradient buffer: each step overwrites it whole.
        """
        for name, param in self.params.items():
            if self.first is None or name != "linear1_weight":
                param.grad = None

    def step(self) -> None:
        """One Adam step: ``optimizer.step()`` the first time, then the same fused kernel called directly.

        ``Adam.step`` spends ~0.4 ms per call in Python (grouping tensors by device, checking state)
        around a ~0.1 ms fused kernel. With the state tensors cached, the kernel it ends in
        (``_fused_adam_``) runs on the same tensors with the same hyper-parameters, so the update is
        bit-identical and the optimizer's state stays current. All parameters have the same step
        count, so they share one step tensor, incremented by one ``add_`` (``_foreach_add_`` over
        ten scalars costs ~25 µs on CPU); the optimizer's own ``step()`` is not called again.
        A low-precision first layer computes its weight gradient first and refreshes its copy after.
        """
        if self.first is not None:
            self.first.weight_gradient()
        if self._fused is None:
            self.optimizer.step()
            self._fused = self._fused_args()
        else:
            params, exp_avgs, exp_avg_sqs, step, hyper = self._fused
            with torch.no_grad():
                step.add_(1)
                torch._fused_adam_(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], [step] * len(params),
                                   **hyper)
        if self.first is not None:
            self.first.refresh()

    def _fused_args(self) -> tuple | None:
        """Cached arguments of the direct call, or None (keep ``optimizer.step()``) unless plain fused Adam."""
        opt = self.optimizer
        group = opt.param_groups[0]
        plain = (len(opt.param_groups) == 1 and group.get("fused") and _has_fused_adam_kernel()
                 and not any(group.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable",
                                                      "decoupled_weight_decay", "foreach"))
                 and not torch.is_tensor(group["lr"]) and not torch.is_tensor(group["betas"][0])
                 and getattr(opt, "grad_scale", None) is None and getattr(opt, "found_inf", None) is None)
        params = list(group["params"])
        if not plain or any(p.grad is None or "exp_avg" not in opt.state[p] for p in params):
            return None
        states = [opt.state[p] for p in params]
        step = states[0]["step"]
        if any(s["step"].shape != () or not torch.equal(s["step"], step) for s in states):
            return None
        for state in states:
            state["step"] = step  # one count for all (they are equal): `step` increments it once
        hyper = dict(amsgrad=False, lr=float(group["lr"]), beta1=float(group["betas"][0]),
                     beta2=float(group["betas"][1]), weight_decay=float(group["weight_decay"]),
                     eps=float(group["eps"]), maximize=False, grad_scale=None, found_inf=None)
        return params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], step, hyper

    @torch.no_grad()
    def retire(self, rows: list[int]) -> list[int]:
        """Write ``rows`` back to the ensemble, drop them; returns the kept row indices."""
        retired = [self.members[r] for r in rows]
        # row by row into the ensemble's own storage: `ens[list] = value[list]` gathers into a new
        # tensor first, and that allocation (43 MB at 8448 features) cost up to ~0.2 s of page faults
        for name, value in [*self.params.items(), *self.buffers.items()]:
            target = getattr(self.ensemble, name)
            for row, member in zip(rows, retired):
                target[member].copy_(value[row])
        keep = [r for r in range(len(self.members)) if r not in rows]
        self.members = [self.members[r] for r in keep]
        if keep and rows:
            self._shrink(keep)
        return keep

    def _shrink(self, keep: list[int]) -> None:
        old_state = {name: self.optimizer.state[p] for name, p in self.params.items()}
        self.params = {k: v[keep].clone().requires_grad_() for k, v in self.params.items()}
        self.buffers = {k: v[keep].clone() for k, v in self.buffers.items()}
        if self.first is not None:
            self.first.rebind(self.params["linear1_weight"])
            self.params["linear1_weight"].grad = self.first.grad
        self.optimizer = _adam(self.params.values(), self.lr)
        for name, param in self.params.items():
            state = old_state[name]  # Adam's per-parameter state: step count and both moments
            self.optimizer.state[param] = {
                "step": state["step"].clone(),
                "exp_avg": state["exp_avg"][keep].clone(),
                "exp_avg_sq": state["exp_avg_sq"][keep].clone(),
            }
        self._fused = None  # new tensors: the next step goes through optimizer.step() and re-caches


def _has_fused_adam_kernel() -> bool:
    """True if ``torch._fused_adam_`` takes the keyword arguments :meth:`_ActiveMembers.step` passes."""
    try:
        names = {arg.name for arg in torch.ops.aten._fused_adam_.default._schema.arguments}
    except (AttributeError, RuntimeError):
        return False
    return {"lr", "beta1", "beta2", "weight_decay", "eps", "amsgrad", "maximize", "grad_scale", "found_inf"} <= names


def train_ensemble(source: PixelSource, num_classes: int, *, seeds: Sequence[int],
                   config: TrainConfig = TrainConfig(), device: str = "cpu",
                   progress: bool = True) -> tuple[EnsembleMLP, list[dict]]:
    """Train all members at once; returns the ensemble (eval mode) and one info dict per member.

    Each step gathers member m's next ``batch_size`` indices of its own permutation, runs one batched
    forward/backward and one Adam step. Info: ``steps``, ``epochs`` (entered), ``stop_epoch`` (None if
    it never early-stopped) and ``final_loss`` (its last mini-batch loss). ``config.precision`` picks
    the first layer's precision (``auto`` is resolved for ``device``); the ensemble predicts in it too.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> src = TensorPixelSource(torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g))
        >>> ens, info = train_ensemble(src, 3, seeds=[0, 1], config=TrainConfig(members=2, max_epochs=1),
        ...                            progress=False)
        >>> [i["steps"] for i in info]
        [4, 4]
    """
    if len(seeds) != config.members:
        raise BenchError(f"got {len(seeds)} seeds for {config.members} members")
    _check_source(source, num_classes, config.batch_size)
    precision = resolve_precision(config.precision, device)
    ensemble = EnsembleMLP(source.dim, num_classes, config.members, config.hidden, seeds, precision).to(device)
    # On CPU a costly gather (sampling features from disk) runs in a prefetch thread that needs a core
    # of its own: torch's intra-op threads from two Python threads at once oversubscribe the cores,
    # which costs more than one fewer matmul thread. See _prefetch_batches for a cheap gather.
    threads = torch.get_num_threads()
    prefetch = _prefetch_batches(source, config, device)
    costly = bool(getattr(source, "gather_is_costly", False))
    if costly and not str(device).startswith("cuda") and threads > 1:
        torch.set_num_threads(threads - 1)
    try:
        working = _ActiveMembers(ensemble, config.lr, precision)
        return _train_loop(source, ensemble, working, seeds, config, device, progress, prefetch)
    finally:
        torch.set_num_threads(threads)


def _record(infos: list[dict], members: list[int], losses: list[float], step_count: int) -> None:
    for member, loss in zip(members, losses):
        infos[member]["steps"], infos[member]["final_loss"] = step_count, loss


def _train_loop(source: "PixelSource", ensemble: "EnsembleMLP", working: "_ActiveMembers", seeds: Sequence[int],
                config: "TrainConfig", device: str, progress: bool,
                prefetch: bool) -> tuple["EnsembleMLP", list[dict]]:
    """The step loop of :func:`train_ensemble` (see there).

    Per-step Python work is kept off the hot path: before ``min_epochs`` the early stop tracks
    nothing, so the losses are read (``tolist``) and the info dicts written only when an epoch or the
    run ends; from ``min_epochs`` on they are read every step, as the stop rule needs them.
    """
    batch, n_pixels = config.batch_size, source.num_pixels
    steps_per_epoch = n_pixels // batch  # drop_last
    shufflers = [torch.Generator().manual_seed(int(s)) for s in seeds]
    stoppers = [EarlyStopper(config.min_epochs, config.patience) for _ in seeds]
    infos = [_new_info() for _ in seeds]

    budget = steps_per_epoch * config.max_epochs
    budget = min(budget, config.max_steps) if config.max_steps is not None else budget
    bar = _progress_bar(steps_per_epoch, progress)
    step_count = 0
    for epoch in range(config.max_epochs):
        if not working.members or step_count == budget:
            break
        bar.reset()
        bar.set_description(f"probe epoch {epoch}, {len(working.members)}/{config.members} members")
        # Stored as int32 (same values, same generator use): 10 members x N*H*W pixels is the largest
        # thing the probe holds, and int64 would double it.
        perms = torch.stack([torch.randperm(n_pixels, generator=shufflers[m]).to(torch.int32)
                             for m in working.members])
        for m in working.members:
            infos[m]["epochs"] += 1
        if prefetch:
            loader = _Prefetcher(source, perms, batch, steps_per_epoch, device, working.dtype)
        else:
            loader = _InlineLoader(source, perms, batch, device, working.dtype)
        tracking = epoch >= config.min_epochs  # EarlyStopper.step is a no-op before min_epochs
        losses = None
        for step in range(steps_per_epoch):
            x, y = loader.take(step)  # [A, B, d], [A*B] (a prefetcher loads the next step's meanwhile)
            n_active = x.shape[0]
            logits = working.forward(x)
            per_pixel = F.cross_entropy(logits.reshape(n_active * batch, -1), y, reduction="none")
            losses = per_pixel.view(n_active, batch).mean(dim=1)
            working.zero_grad()
            losses.sum().backward()  # sum of per-member means: each member gets its own gradient
            working.step()
            step_count += 1
            bar.update(1)
            if not tracking:
                if step_count == budget:
                    break
                continue

            values = losses.tolist()  # the stop rule needs every step's losses from here on
            losses = None  # recorded now
            _record(infos, working.members, values, step_count)
            stopped = [row for row, (member, loss) in enumerate(zip(working.members, values))
                       if stoppers[member].step(epoch, loss)]
            for row in stopped:
                infos[working.members[row]]["stop_epoch"] = epoch
            if step_count == budget:
                break
            if stopped:
                keep = working.retire(stopped)
                if not working.members:
                    break
                loader.keep_rows(keep)
                bar.set_description(f"probe epoch {epoch}, {len(working.members)}/{config.members} members")
        if losses is not None:  # an untracked epoch: its last step's losses are the members' latest
            _record(infos, working.members, losses.tolist(), step_count)
        loader.close()
    working.retire(list(range(len(working.members))))
    bar.close()
    return ensemble.eval(), infos


def train_member(source: PixelSource, num_classes: int, *, seed: int, config: TrainConfig = TrainConfig(),
                 device: str = "cpu") -> tuple[nn.Sequential, dict]:
    """The sequential reference: one member as a plain ``nn.Sequential``, trained alone.

    Same initial weights, permutation stream and early stop as member ``m`` of :func:`train_ensemble`
    with ``seeds[m] == seed``, so both must agree to float tolerance.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> src = TensorPixelSource(torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g))
        >>> model, info = train_member(src, 3, seed=0, config=TrainConfig(max_epochs=1))
        >>> info["steps"], model.training
        (4, False)
    """
    _check_source(source, num_classes, config.batch_size)
    hidden = config.hidden if config.hidden is not None else mlp_hidden_sizes(num_classes)
    model = _init_member(source.dim, num_classes, hidden, seed).to(device).train()
    optimizer = _adam(model.parameters(), config.lr)
    shuffler = torch.Generator().manual_seed(int(seed))
    stopper = EarlyStopper(config.min_epochs, config.patience)
    info = _new_info()
    batch, n_pixels = config.batch_size, source.num_pixels
    budget = config.max_steps if config.max_steps is not None else math.inf
    for epoch in range(config.max_epochs):
        if info["stop_epoch"] is not None or info["steps"] >= budget:
            break
        perm = torch.randperm(n_pixels, generator=shuffler)
        info["epochs"] += 1
        for step in range(n_pixels // batch):
            index = perm[step * batch:(step + 1) * batch]
            x = source.gather(index).to(device, torch.float32)
            loss = F.cross_entropy(model(x), source.labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            info["steps"] += 1
            info["final_loss"] = loss.item()
            if stopper.step(epoch, info["final_loss"]):
                info["stop_epoch"] = epoch
                break
            if info["steps"] >= budget:
                break
    return model.eval(), info

