"""The probe's model (spec §5.1, §5.2): M pixel MLPs stored as stacked tensors, one batched op per layer.

Each member is Linear -> ReLU -> BatchNorm1d -> Linear -> ReLU -> BatchNorm1d -> Linear (BN after
ReLU), initialised N(0, 0.02) / zero bias from its own generator. ``bench.probe`` re-exports every
public name here; the training loop is in :mod:`bench.probe`, the precision modes in
:mod:`bench.probe_precision`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

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


def _layer_sizes(in_dim: int, num_classes: int, hidden: Sequence[int]) -> list[tuple[int, int]]:
    """(in, out) of the Linear layers: three for the paper's two hidden widths (any number for Table 7)."""
    widths = [int(in_dim), *(int(w) for w in hidden), int(num_classes)]
    return list(zip(widths[:-1], widths[1:]))


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
    """``x [M, B, d]`` -> logits ``[M, B, K]`` with stacked weights ``[M, in, out]`` (all float32)."""
    return _ensemble_tail(params, buffers, torch.baddbmm(params["linear1_bias"], x, params["linear1_weight"]).relu(),
                          training)


def _ensemble_tail(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], h: Tensor,
                   training: bool) -> Tensor:
    """Everything after the first layer's ReLU: ``[M, B, h1]`` -> logits ``[M, B, K]``.

    Split off so that a low-precision first layer (:mod:`bench.probe_precision`) feeds the same
    float32 ops as the reference path.
    """
    depth = sum(1 for name in params if name.startswith("norm") and name.endswith("_weight"))  # hidden layers
    for i in range(1, depth + 1):
        h = _batch_norm(h, params[f"norm{i}_weight"], params[f"norm{i}_bias"], buffers[f"norm{i}_running_mean"],
                        buffers[f"norm{i}_running_var"], training)
        h = torch.baddbmm(params[f"linear{i + 1}_bias"], h, params[f"linear{i + 1}_weight"])
        if i < depth:
            h = h.relu()
    return h


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
                 hidden: Sequence[int] | None = None, seeds: Sequence[int] | None = None,
                 precision: str = "fp32") -> None:
        super().__init__()
        from bench.probe_precision import check_precision

        #: the first layer's compute precision in :meth:`predict` (training sets it to its own mode)
        self.precision = check_precision(precision)
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
        pixels here; that is the bulk of the prediction cost. It runs in ``self.precision`` (inputs
        and weights rounded to bf16/fp16, float32 accumulation, as in training); the rest in float32.
        """
        from bench.probe_precision import compute_dtype

        params, buffers = dict(self.named_parameters()), dict(self.named_buffers())
        w1 = params["linear1_weight"]  # [M, d, h1]
        m, d, h1 = w1.shape
        dtype = compute_dtype(self.precision)
        w1 = w1.permute(1, 0, 2).reshape(d, m * h1)
        if dtype == torch.float32:
            h = feats.to(w1) @ w1  # [P, M*h1]
        else:
            h = (feats.to(w1.device, dtype) @ w1.to(dtype)).float()
        h = h.view(-1, m, h1).transpose(0, 1) + params["linear1_bias"]
        logits = _ensemble_tail(params, buffers, h.relu_(), training=False)
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


def _empty_member(in_dim: int, num_classes: int, hidden: Sequence[int]) -> nn.Sequential:
    # skip_init: the default Linear init would draw from (and so change) the global RNG for nothing.
    layers: list[nn.Module] = []
    for n_in, n_out in _layer_sizes(in_dim, num_classes, hidden)[:-1]:
        layers += [nn.utils.skip_init(nn.Linear, n_in, n_out), nn.ReLU(),
                   nn.BatchNorm1d(n_out, eps=BN_EPS, momentum=BN_MOMENTUM)]
    return nn.Sequential(*layers, nn.utils.skip_init(nn.Linear, *_layer_sizes(in_dim, num_classes, hidden)[-1]))


def _init_member(in_dim: int, num_classes: int, hidden: Sequence[int], seed: int) -> nn.Sequential:
    """One member as ``nn.Sequential`` with exactly the weights :class:`EnsembleMLP` gives ``seed``."""
    seq = _empty_member(in_dim, num_classes, hidden)
    weights = _draw_linear_weights(_layer_sizes(in_dim, num_classes, hidden), seed)
    with torch.no_grad():
        for linear, weight in zip([layer for layer in seq if isinstance(layer, nn.Linear)], weights):
            linear.weight.copy_(weight)
            linear.bias.zero_()
    return seq

