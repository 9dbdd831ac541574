"""The pixel probe (spec §5, §6): an ensemble of small MLPs, trained together as one batched model.

Each of the M members is Linear -> ReLU -> BatchNorm1d -> Linear -> ReLU -> BatchNorm1d -> Linear
(BN after ReLU), initialised N(0, 0.02) / zero bias from its own generator. The members are stored
as stacked parameters ``[M, ...]`` so one ``baddbmm`` runs a layer for all of them; each member still
reads its own shuffled pixel stream and has its own early stop, exactly as if it were trained alone
(:func:`train_member` is that one-member reference, and a test proves both give the same weights).

Pixels come from a :class:`PixelSource` one batch at a time, so the probe never sees the full
``[N*H*W, d]`` matrix that makes the official code need ~177 GB for Bedroom-28.

Seeds: member m uses ``seeds[m]`` twice, in two independent ``torch.Generator`` objects: one draws its
initial weights (layer by layer, ``[out, in]`` order like ``nn.Linear.weight``), the other its
per-epoch ``randperm``. The caller derives ``seeds`` from the run seed (spec §8.3).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import BenchError

INIT_STD = 0.02  # spec §5.2
BN_MOMENTUM = 0.1  # torch defaults, which the official code keeps (spec §5.2)
BN_EPS = 1e-5


def mlp_hidden_sizes(num_classes: int) -> tuple[int, int]:
    """Hidden widths of one member: K < 30 -> (128, 32), otherwise (256, 128) (spec §5.1).

    Example:
        >>> mlp_hidden_sizes(29), mlp_hidden_sizes(34)
        ((128, 32), (256, 128))
    """
    return (128, 32) if num_classes < 30 else (256, 128)


def _layer_sizes(in_dim: int, num_classes: int, hidden: tuple[int, int]) -> list[tuple[int, int]]:
    """(in, out) of the three Linear layers."""
    return [(in_dim, hidden[0]), (hidden[0], hidden[1]), (hidden[1], num_classes)]


def _draw_linear_weights(sizes: list[tuple[int, int]], seed: int) -> list[Tensor]:
    """The three ``[out, in]`` weight matrices of one member, in layer order, from ``seed``.

    Both the ensemble and the sequential reference call this, so their initial weights are equal.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return [torch.empty(n_out, n_in).normal_(0.0, INIT_STD, generator=generator) for n_in, n_out in sizes]


def _batch_norm(h: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                training: bool) -> Tensor:
    """BatchNorm1d for all members in one op: ``h`` is ``[M, B, C]``, statistics over dim 1.

    Member m's channel c becomes channel ``m*C + c`` of one ``[B, M*C]`` batch, so torch's own
    batch-norm kernel (biased variance to normalise, unbiased variance into the running stats,
    momentum 0.1) does the work. Sharing the kernel of ``nn.BatchNorm1d`` keeps the rounding as close
    as possible to the sequential reference, which matters because Adam divides by the gradient's
    own size: where a gradient is ~0 (e.g. a pre-BN bias of a unit active on the whole batch) a
    rounding difference becomes a full ``lr`` step. The running-stat tensors are ``[M, 1, C]`` and contiguous, so their flat views update in place.
    """
    members, batch, channels = h.shape
    flat = h.transpose(0, 1).reshape(batch, members * channels)
    out = F.batch_norm(flat, running_mean.view(-1), running_var.view(-1), weight.reshape(-1),
                       bias.reshape(-1), training=training, momentum=BN_MOMENTUM, eps=BN_EPS)
    return out.view(batch, members, channels).transpose(0, 1)


def _ensemble_forward(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor,
                      training: bool) -> Tensor:
    """``x [M, B, d]`` -> logits ``[M, B, K]`` with stacked weights ``[M, in, out]``."""
    h = x
    for i in (1, 2):
        h = torch.baddbmm(params[f"linear{i}_bias"], h, params[f"linear{i}_weight"]).relu()
        h = _batch_norm(h, params[f"norm{i}_weight"], params[f"norm{i}_bias"],
                        buffers[f"norm{i}_running_mean"], buffers[f"norm{i}_running_var"], training)
    return torch.baddbmm(params["linear3_bias"], h, params["linear3_weight"])


class EnsembleMLP(nn.Module):
    """M independent pixel MLPs stored as stacked tensors; ``forward(x [M, B, d]) -> [M, B, K]``.

    Parameters are ``linear{i}_weight [M, in, out]``, ``linear{i}_bias [M, 1, out]``,
    ``norm{i}_weight/bias [M, 1, C]`` and buffers ``norm{i}_running_mean/var [M, 1, C]``.

    Example:
        >>> import torch
        >>> ens = EnsembleMLP(in_dim=16, num_classes=3, members=4, seeds=[0, 1, 2, 3])
        >>> ens(torch.randn(4, 8, 16)).shape
        torch.Size([4, 8, 3])
        >>> labels, probs = ens.predict(torch.randn(5, 16))
        >>> labels.shape, probs.shape
        (torch.Size([4, 5]), torch.Size([4, 5, 3]))
    """

    def __init__(self, in_dim: int, num_classes: int, members: int = 10,
                 hidden: tuple[int, int] | None = None, seeds: Sequence[int] | None = None) -> None:
        super().__init__()
        seeds = list(range(members)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != members:
            raise BenchError(f"EnsembleMLP got {len(seeds)} seeds for {members} members")
        self.in_dim, self.num_classes, self.members = int(in_dim), int(num_classes), int(members)
        self.hidden = tuple(hidden) if hidden is not None else mlp_hidden_sizes(num_classes)
        sizes = _layer_sizes(self.in_dim, self.num_classes, self.hidden)
        per_member = [_draw_linear_weights(sizes, seed) for seed in seeds]
        for i, (n_in, n_out) in enumerate(sizes, start=1):
            # nn.Linear stores [out, in]; bmm wants [in, out].
            stacked = torch.stack([weights[i - 1].t() for weights in per_member]).contiguous()
            self.register_parameter(f"linear{i}_weight", nn.Parameter(stacked))
            self.register_parameter(f"linear{i}_bias", nn.Parameter(torch.zeros(members, 1, n_out)))
        for i, width in enumerate(self.hidden, start=1):
            self.register_parameter(f"norm{i}_weight", nn.Parameter(torch.ones(members, 1, width)))
            self.register_parameter(f"norm{i}_bias", nn.Parameter(torch.zeros(members, 1, width)))
            self.register_buffer(f"norm{i}_running_mean", torch.zeros(members, 1, width))
            self.register_buffer(f"norm{i}_running_var", torch.ones(members, 1, width))

    def forward(self, x: Tensor) -> Tensor:
        """``x [M, B, d]`` (member m's batch in row m) -> logits ``[M, B, K]``."""
        return _ensemble_forward(dict(self.named_parameters()), dict(self.named_buffers()), x, self.training)

    @torch.no_grad()
    def predict(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Eval-mode labels ``[M, P]`` (int64) and softmax ``[M, P, K]`` of every member for ``feats [P, d]``.

        The first layer runs as one ``[P, d] @ [d, M*h1]`` matmul, since every member sees the same
        pixels here; that is the bulk of the prediction cost.
        """
        params, buffers = dict(self.named_parameters()), dict(self.named_buffers())
        feats = feats.to(params["linear1_weight"])
        w1 = params["linear1_weight"]  # [M, d, h1]
        m, d, h1 = w1.shape
        h = feats @ w1.permute(1, 0, 2).reshape(d, m * h1)  # [P, M*h1]
        h = h.view(-1, m, h1).transpose(0, 1) + params["linear1_bias"]
        h = _batch_norm(h.relu_(), params["norm1_weight"], params["norm1_bias"],
                        buffers["norm1_running_mean"], buffers["norm1_running_var"], training=False)
        h = torch.baddbmm(params["linear2_bias"], h, params["linear2_weight"]).relu_()
        h = _batch_norm(h, params["norm2_weight"], params["norm2_bias"],
                        buffers["norm2_running_mean"], buffers["norm2_running_var"], training=False)
        logits = torch.baddbmm(params["linear3_bias"], h, params["linear3_weight"])
        return logits.argmax(-1), logits.softmax(-1)

    @torch.no_grad()
    def member(self, m: int) -> nn.Sequential:
        """Member ``m`` as an ordinary ``nn.Sequential`` (a copy, for inspection and reference checks).

        Example:
            >>> ens = EnsembleMLP(in_dim=16, num_classes=3, members=2)
            >>> [type(layer).__name__ for layer in ens.member(1)]
            ['Linear', 'ReLU', 'BatchNorm1d', 'Linear', 'ReLU', 'BatchNorm1d', 'Linear']
        """
        if not 0 <= m < self.members:
            raise BenchError(f"member index {m} out of range 0..{self.members - 1}")
        seq = _empty_member(self.in_dim, self.num_classes, self.hidden)
        linears = [layer for layer in seq if isinstance(layer, nn.Linear)]
        norms = [layer for layer in seq if isinstance(layer, nn.BatchNorm1d)]
        for i, linear in enumerate(linears, start=1):
            linear.weight.copy_(getattr(self, f"linear{i}_weight")[m].t())
            linear.bias.copy_(getattr(self, f"linear{i}_bias")[m, 0])
        for i, norm in enumerate(norms, start=1):
            norm.weight.copy_(getattr(self, f"norm{i}_weight")[m, 0])
            norm.bias.copy_(getattr(self, f"norm{i}_bias")[m, 0])
            norm.running_mean.copy_(getattr(self, f"norm{i}_running_mean")[m, 0])
            norm.running_var.copy_(getattr(self, f"norm{i}_running_var")[m, 0])
        return seq.to(self.linear1_weight.device).eval()


def _empty_member(in_dim: int, num_classes: int, hidden: tuple[int, int]) -> nn.Sequential:
    # skip_init: the default Linear init would draw from (and so change) the global RNG for nothing.
    def linear(n_in: int, n_out: int) -> nn.Linear:
        return nn.utils.skip_init(nn.Linear, n_in, n_out)

    h1, h2 = hidden
    return nn.Sequential(
        linear(in_dim, h1), nn.ReLU(), nn.BatchNorm1d(h1, eps=BN_EPS, momentum=BN_MOMENTUM),
        linear(h1, h2), nn.ReLU(), nn.BatchNorm1d(h2, eps=BN_EPS, momentum=BN_MOMENTUM),
        linear(h2, num_classes),
    )


def _init_member(in_dim: int, num_classes: int, hidden: tuple[int, int], seed: int) -> nn.Sequential:
    """One member as ``nn.Sequential`` with exactly the weights :class:`EnsembleMLP` gives ``seed``."""
    seq = _empty_member(in_dim, num_classes, hidden)
    weights = _draw_linear_weights(_layer_sizes(in_dim, num_classes, hidden), seed)
    with torch.no_grad():
        for linear, weight in zip([layer for layer in seq if isinstance(layer, nn.Linear)], weights):
            linear.weight.copy_(weight)
            linear.bias.zero_()
    return seq


# ---- data source ---------------------------------------------------------------------------------

class PixelSource(Protocol):
    """Training pixels as the feature store provides them (labels already filtered of ignore).

    ``gather(index int64 [n]) -> float32 [n, dim]``; ``labels`` is int64 ``[num_pixels]``. Anything
    with these members works; the probe asks for ``members * batch_size`` pixels per step. An optional
    ``gather_is_costly = True`` (e.g. sampling from disk) makes the probe load the next step's pixels
    in a background thread with a core of its own; otherwise each step gathers its own, inline.

    Example:
        >>> import torch
        >>> source: PixelSource = TensorPixelSource(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]))
        >>> source.num_pixels, source.dim, source.gather(torch.tensor([3])).shape
        (4, 2, torch.Size([1, 2]))
    """

    num_pixels: int
    dim: int
    labels: Tensor

    def gather(self, index: Tensor) -> Tensor: ...


class TensorPixelSource:
    """A :class:`PixelSource` over an in-memory ``[n, d]`` tensor (tests, demos, benchmarks).

    Example:
        >>> import torch
        >>> src = TensorPixelSource(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 0]))
        >>> src.gather(torch.tensor([2, 0])).tolist()
        [[4.0, 5.0], [0.0, 1.0]]
    """

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        if features.ndim != 2 or labels.shape != features.shape[:1]:
            raise BenchError(f"features [n, d] and labels [n] expected, got {tuple(features.shape)} "
                             f"and {tuple(labels.shape)}")
        self.features = features
        self.labels = labels.long()
        self.num_pixels, self.dim = features.shape

    def gather(self, index: Tensor) -> Tensor:
        """float32 features of the pixels in ``index`` (int64 ``[n]``), in that order."""
        return self.features.index_select(0, index).float()


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
    """

    def __init__(self, ensemble: EnsembleMLP, lr: float) -> None:
        self.ensemble, self.lr = ensemble, lr
        self.members = list(range(ensemble.members))  # ensemble index of each working row
        self.params = {k: v.detach().clone().requires_grad_() for k, v in ensemble.named_parameters()}
        self.buffers = {k: v.clone() for k, v in ensemble.named_buffers()}
        self.optimizer = _adam(self.params.values(), lr)
        self._fused: tuple | None = None  # the direct fused-Adam call's arguments, see `step`

    def zero_grad(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)`` without its per-call bookkeeping."""
        for param in self.params.values():
            param.grad = None

    def step(self) -> None:
        """One Adam step: ``optimizer.step()`` the first time, then the same fused kernel called directly.

        ``Adam.step`` spends ~0.4 ms per call in Python (grouping tensors by device, checking state)
        around a ~0.1 ms fused kernel. With the state tensors cached, the kernel it ends in
        (``_fused_adam_``) runs on the same tensors with the same hyper-parameters, so the update is
        bit-identical and the optimizer's state stays current. All parameters have the same step
        count, so they share one step tensor, incremented by one ``add_`` (``_foreach_add_`` over
        ten scalars costs ~25 µs on CPU); the optimizer's own ``step()`` is not called again.
        """
        if self._fused is None:
            self.optimizer.step()
            self._fused = self._fused_args()
            return
        params, exp_avgs, exp_avg_sqs, step, hyper = self._fused
        with torch.no_grad():
            step.add_(1)
            torch._fused_adam_(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], [step] * len(params),
                               **hyper)

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
        for name, value in [*self.params.items(), *self.buffers.items()]:
            getattr(self.ensemble, name)[retired] = value[rows]
        keep = [r for r in range(len(self.members)) if r not in rows]
        self.members = [self.members[r] for r in keep]
        if keep and rows:
            self._shrink(keep)
        return keep

    def _shrink(self, keep: list[int]) -> None:
        old_state = {name: self.optimizer.state[p] for name, p in self.params.items()}
        self.params = {k: v[keep].clone().requires_grad_() for k, v in self.params.items()}
        self.buffers = {k: v[keep].clone() for k, v in self.buffers.items()}
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


class _Prefetcher:
    """Loads step ``s + 1``'s pixels in a background thread while step ``s`` trains.

    Gathering features (sampling fp16 maps, indexing) and the MLP step run in torch ops that release
    the GIL, so they overlap. On CUDA the batch goes through pinned memory with a non-blocking copy.
    When members retire mid-epoch, the rows of the already-loaded batch are sliced the same way as
    ``perms``, so every member still sees exactly its own pixel stream.
    """

    def __init__(self, source: "PixelSource", perms: Tensor, batch: int, steps: int, device: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.source, self.perms, self.batch, self.steps = source, perms, batch, steps
        self.cuda = str(device).startswith("cuda")
        self.device = device
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = self.pool.submit(self._load, 0, perms)

    def _load(self, step: int, perms: Tensor) -> tuple[Tensor, Tensor]:
        index = perms[:, step * self.batch:(step + 1) * self.batch].long()  # [A, B]
        x = self.source.gather(index.reshape(-1)).to(torch.float32).view(index.shape[0], self.batch, -1)
        y = self.source.labels[index.reshape(-1)].view(index.shape[0], self.batch)
        if self.cuda:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def take(self, step: int) -> tuple[Tensor, Tensor]:
        x, y = self.pending.result()
        if step + 1 < self.steps:
            self.pending = self.pool.submit(self._load, step + 1, self.perms)
        x = x.to(self.device, non_blocking=self.cuda)
        y = y.to(self.device, non_blocking=self.cuda)
        return x, y.reshape(-1)

    def keep_rows(self, keep: list[int]) -> None:
        """Members retired: keep only these rows of the permutations and of the batch in flight."""
        self.perms = self.perms[keep]
        pending = self.pending
        self.pending = self.pool.submit(lambda: tuple(t[keep] for t in pending.result()))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _InlineLoader:
    """Gathers each step's pixels when the step asks for them: the :class:`_Prefetcher` interface, no thread.

    For sources whose gather is cheap (features in RAM): a ``[members*batch]`` row gather costs less
    than handing the work to a thread and back, and a second Python thread running torch ops beside
    the step's intra-op threads oversubscribes the cores. Same pixels, same order, one gather per step.
    """

    def __init__(self, source: "PixelSource", perms: Tensor, batch: int, device: str) -> None:
        self.source, self.perms, self.batch, self.device = source, perms, batch, device

    def take(self, step: int) -> tuple[Tensor, Tensor]:
        index = self.perms[:, step * self.batch:(step + 1) * self.batch].long().view(-1)  # [A*B]
        x = self.source.gather(index).to(self.device, torch.float32).view(self.perms.shape[0], self.batch, -1)
        return x, self.source.labels.index_select(0, index).to(self.device)  # faster than [index]

    def keep_rows(self, keep: list[int]) -> None:
        self.perms = self.perms[keep]

    def close(self) -> None:
        pass


def train_ensemble(source: PixelSource, num_classes: int, *, seeds: Sequence[int],
                   config: TrainConfig = TrainConfig(), device: str = "cpu",
                   progress: bool = True) -> tuple[EnsembleMLP, list[dict]]:
    """Train all members at once; returns the ensemble (eval mode) and one info dict per member.

    Each step gathers member m's next ``batch_size`` indices of its own permutation, runs one batched
    forward/backward and one Adam step. Info: ``steps``, ``epochs`` (entered), ``stop_epoch`` (None if
    it never early-stopped) and ``final_loss`` (its last mini-batch loss).

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
    ensemble = EnsembleMLP(source.dim, num_classes, config.members, config.hidden, seeds).to(device)
    working = _ActiveMembers(ensemble, config.lr)
    # On CPU a costly gather (sampling features from disk) runs in a prefetch thread that needs a core
    # of its own: torch's intra-op threads from two Python threads at once oversubscribe the cores,
    # which costs more than one fewer matmul thread. See _prefetch_batches for a cheap gather.
    threads = torch.get_num_threads()
    prefetch = _prefetch_batches(source, config, device)
    costly = bool(getattr(source, "gather_is_costly", False))
    if costly and not str(device).startswith("cuda") and threads > 1:
        torch.set_num_threads(threads - 1)
    try:
        return _train_loop(source, ensemble, working, seeds, config, device, progress, prefetch)
    finally:
        torch.set_num_threads(threads)


PREFETCH_MIN_BYTES = 1 << 20  # a cheap gather smaller than this per step is not worth a thread hand-off


def _prefetch_batches(source: PixelSource, config: TrainConfig, device: str) -> bool:
    """Whether the next step's pixels load in a background thread (True) or each step gathers its own.

    Always for CUDA (pinned-memory copies overlap the step) and for a costly gather. A cheap gather
    (features in RAM) runs inline unless a core is left idle by torch's threads and the step's
    batch is large (``members * batch_size * dim * 4`` bytes >= ``PREFETCH_MIN_BYTES``): with every
    core running intra-op threads, a second Python thread running torch ops oversubscribes them
    (demo size, 2 threads on 2 cores, ``DensePixels``: 8.7 ms per step with the prefetch thread, 1.7 ms
    inline, at 5 features; 11.4 vs 6.4 ms at 864), and a small gather costs less than the hand-off.
    See benchmarks/bench_probe_small.py.

    Example:
        >>> import torch
        >>> src = TensorPixelSource(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]))
        >>> _prefetch_batches(src, TrainConfig(), "cpu")
        False
    """
    if str(device).startswith("cuda") or getattr(source, "gather_is_costly", False):
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    batch_bytes = config.members * config.batch_size * source.dim * 4
    return torch.get_num_threads() < cores and batch_bytes >= PREFETCH_MIN_BYTES


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
            loader = _Prefetcher(source, perms, batch, steps_per_epoch, device)
        else:
            loader = _InlineLoader(source, perms, batch, device)
        tracking = epoch >= config.min_epochs  # EarlyStopper.step is a no-op before min_epochs
        losses = None
        for step in range(steps_per_epoch):
            x, y = loader.take(step)  # [A, B, d], [A*B] (a prefetcher loads the next step's meanwhile)
            n_active = x.shape[0]
            logits = _ensemble_forward(working.params, working.buffers, x, training=True)
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


# ---- prediction ----------------------------------------------------------------------------------

def majority_vote(member_labels: Tensor, num_classes: int | None = None) -> Tensor:
    """Per-pixel mode over dim 0 (the members); ties go to the smallest label id (spec §6).

    Example:
        >>> import torch
        >>> votes = torch.tensor([3] * 5 + [7] * 5).view(10, 1)
        >>> majority_vote(votes).tolist()
        [3]
    """
    if num_classes is None:
        num_classes = int(member_labels.max()) + 1 if member_labels.numel() else 1
    counts = torch.zeros((num_classes, *member_labels.shape[1:]), dtype=torch.int32, device=member_labels.device)
    counts.scatter_add_(0, member_labels.long(), torch.ones_like(member_labels, dtype=torch.int32))
    # argmax returns the first maximal index, i.e. the smallest id among tied counts.
    return counts.argmax(dim=0)


def js_uncertainty(member_probs: Tensor) -> Tensor:
    """Per-pixel Jensen-Shannon divergence H(mean p) - mean H(p_m) (natural log) of ``[M, P, K]``.

    Example:
        >>> import torch
        >>> probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two members, sure and disagreeing
        >>> round(js_uncertainty(probs).item(), 4)  # ln 2
        0.6931
    """
    def entropy(p: Tensor) -> Tensor:
        return -torch.special.xlogy(p, p).sum(dim=-1)  # xlogy gives 0 * log 0 = 0

    mean_entropy = entropy(member_probs).mean(dim=0)
    return (entropy(member_probs.mean(dim=0)) - mean_entropy).clamp_min(0.0)  # clamp rounding below 0


def image_uncertainty(js: Tensor) -> float:
    """Image score: mean of the ``floor(P/10)`` largest per-pixel JSD values (at least one value).

    Example:
        >>> import torch
        >>> image_uncertainty(torch.arange(20.0))  # top 2 of 20: 19 and 18
        18.5
    """
    k = max(1, js.numel() // 10)
    return float(js.flatten().topk(k).values.mean())


def predict_chunked(ensemble: EnsembleMLP, feats_fn: Callable[[slice], Tensor], num_pixels: int, *,
                    chunk: int = 65536, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """Label ``num_pixels`` pixels chunk by chunk: majority-vote labels ``[P]`` and JSD ``[P]`` (CPU).

    ``feats_fn(slice)`` returns the ``[n, d]`` features of that pixel range; memory stays bounded
    by ``chunk`` whatever the image size.

    Example:
        >>> import torch
        >>> ens = EnsembleMLP(in_dim=4, num_classes=3, members=3).eval()
        >>> feats = torch.randn(10, 4)
        >>> labels, js = predict_chunked(ens, lambda s: feats[s], 10, chunk=4)
        >>> labels.shape, js.shape
        (torch.Size([10]), torch.Size([10]))
    """
    ensemble = ensemble.to(device)
    labels = torch.empty(num_pixels, dtype=torch.int64)
    js = torch.empty(num_pixels, dtype=torch.float32)
    for start in range(0, num_pixels, chunk):
        part = slice(start, min(start + chunk, num_pixels))
        member_labels, member_probs = ensemble.predict(feats_fn(part).to(device, torch.float32))
        labels[part] = majority_vote(member_labels, ensemble.num_classes).cpu()
        js[part] = js_uncertainty(member_probs).float().cpu()
    return labels, js
