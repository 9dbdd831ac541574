"""Precision modes of the probe's first layer: ``fp32`` (the reference), ``bf16``, ``fp16`` (CUDA only).

At 8448 features the first layer is nearly all of a probe step: its forward GEMM
(``[M, 64, d] @ [M, d, 128]``), its weight-gradient GEMM (``[M, d, 64] @ [M, 64, 128]``) and Adam over its
``M * d * 128`` weights. A low-precision mode runs the two GEMMs on bf16/fp16 inputs (the tensor units:
AMX on recent Xeons, tensor cores on GPUs) with float32 accumulation, and keeps everything that
accumulates in float32: the master weights, Adam's moments and the update, the small layers, batch
norm, the loss. This is what ``torch.autocast`` does to a ``Linear``, written out so that the
features are cast once per batch in the loader, the low-precision weight copy is refreshed in place
after each step, and the weight gradient lands in one float32 buffer Adam reads (no per-step
allocation of weight-sized tensors).

``auto`` picks bf16 where the hardware computes it natively (CPUs with AMX or AVX512-BF16; CUDA GPUs
with bf16 support) and the features are wide enough for the first layer to dominate a step
(:data:`AUTO_BF16_MIN_FEATURES`), fp32 elsewhere; fp16 is never picked automatically. Why bf16 is the default:
on the demo its mIoU over 5 seeds is within one standard deviation of fp32 (benchmarks/README.md).
The mode is part of a run's key, so results of different precisions are never mixed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bench.errors import BenchError

PRECISIONS = ("fp32", "bf16", "fp16")
CHOICES = ("auto", *PRECISIONS)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: fp16 weight gradients are computed from ``scale * grad``, a power of two that puts the largest
#: possible product sum at about this value: far from fp16's 65504, far above its subnormals.
FP16_GRAD_TARGET = 2.0**12


def check_precision(precision: str) -> str:
    """``precision`` if it is a concrete mode (fp32, bf16, fp16), else a one-line BenchError.

    Example:
        >>> check_precision("bf16")
        'bf16'
    """
    if precision not in PRECISIONS:
        raise BenchError(f"probe precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    """The first layer's GEMM input dtype of a mode.

    Example:
        >>> compute_dtype("bf16")
        torch.bfloat16
    """
    return _DTYPES[check_precision(precision)]


def cpu_has_fast_bf16() -> bool:
    """True if this CPU computes bf16 matmuls natively (AMX tiles or AVX512-BF16), not by emulation."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except (RuntimeError, AttributeError):
        return False


#: ``auto`` picks bf16 only from this many features per pixel: below it the first layer is not what a
#: step costs (CPU, 10 members, per step: 864 features bf16 5.6-5.8 ms vs fp32 5.7-5.9 ms; 5 features
#: 1.65 vs 1.34 ms, the casts cost more than they save; 8448 features: 2x, benchmarks/README.md)
AUTO_BF16_MIN_FEATURES = 2048


def resolve_precision(precision: str, device: str, num_features: int | None = None) -> str:
    """A concrete mode for ``device``: ``auto`` -> bf16 where native (see module doc) and the features
    are wide enough to gain (``num_features`` >= :data:`AUTO_BF16_MIN_FEATURES`, or unknown), else fp32.

    fp16 is refused off CUDA (no CPU here computes fp16 GEMMs faster than fp32: 17 ms vs 11 ms for
    the probe's first layer on this AMX box), and a mode's name is checked before any work.

    Example:
        >>> resolve_precision("fp32", "cpu")
        'fp32'
        >>> resolve_precision("auto", "mps"), resolve_precision("auto", "cpu", num_features=864)
        ('fp32', 'fp32')
    """
    device = str(device)
    if precision == "auto":
        if num_features is not None and num_features < AUTO_BF16_MIN_FEATURES:
            return "fp32"
        if device.startswith("cuda"):
            return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
        if device == "cpu":
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        return "fp32"
    check_precision(precision)
    if precision == "fp16" and not device.startswith("cuda"):
        raise BenchError(f"probe precision fp16 needs a CUDA device (got {device!r}); use bf16 or fp32")
    return precision


class LowPrecisionFirstLayer:
    """The stacked first layer's GEMMs in bf16/fp16 for a float32 master weight ``[A, d, h]``.

    ``forward(x)`` takes the batch already in the low dtype and returns the float32 pre-activation
    ``[A, B, h]`` (without bias) as a leaf tensor that requires grad; the float32 rest of the model
    is built on it with autograd. After ``backward``, :meth:`weight_gradient` turns that leaf's
    gradient into the weight gradient, in the float32 buffer ``grad`` (what Adam reads), and
    :meth:`refresh` copies the updated master weight into the low-precision copy. For fp16 the
    gradient GEMM runs on ``scale * grad`` (a power of two, so exact) to stay clear of fp16's range
    limits, and ``grad`` is divided by it again.

    Example:
        >>> import torch
        >>> w = torch.randn(2, 8, 4)
        >>> layer = LowPrecisionFirstLayer(w, torch.bfloat16)
        >>> h = layer.forward(torch.randn(2, 3, 8).bfloat16())
        >>> h.sum().backward(); layer.weight_gradient()
        >>> layer.grad.shape, layer.grad.dtype
        (torch.Size([2, 8, 4]), torch.float32)
    """

    def __init__(self, weight: Tensor, dtype: torch.dtype) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise BenchError(f"LowPrecisionFirstLayer needs bf16 or fp16, got {dtype}")
        self.dtype = dtype
        self.weight = weight  # the float32 master, updated in place by the optimizer
        with torch.no_grad():
            self.low = weight.detach().to(dtype)
        self.grad = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        self._low_grad = torch.empty_like(self.low)
        self._x: Tensor | None = None
        self._h: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``x [A, B, d]`` (low dtype) -> float32 ``x @ W`` ``[A, B, h]``, a leaf that requires grad."""
        if x.dtype != self.dtype:
            raise BenchError(f"first-layer input is {x.dtype}, expected {self.dtype}")
        with torch.no_grad():
            h = torch.bmm(x, self.low).float()
        self._x, self._h = x, h.requires_grad_()
        return self._h

    @torch.no_grad()
    def weight_gradient(self) -> None:
        """``grad = x^T @ dL/dh`` for the last forward (float32 result, low-precision GEMM)."""
        x, h = self._x, self._h
        if x is None or h is None or h.grad is None:
            raise BenchError("LowPrecisionFirstLayer.weight_gradient called before forward and backward")
        g = h.grad
        if self.dtype == torch.float16:
            scale = _fp16_grad_scale(x, g)
            torch.bmm(x.transpose(1, 2), (g * scale).to(self.dtype), out=self._low_grad)
            self.grad.copy_(self._low_grad).div_(scale)
        else:  # bf16 has float32's range: no scaling needed
            torch.bmm(x.transpose(1, 2), g.to(self.dtype), out=self._low_grad)
            self.grad.copy_(self._low_grad)
        self._x = self._h = None  # the batch is not needed any more

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the (just updated) float32 master weight into the low-precision copy, in place."""
        self.low.copy_(self.weight)

    def rebind(self, weight: Tensor) -> None:
        """Members retired: ``weight`` is the new (smaller) master; buffers follow its shape."""
        self.__init__(weight, self.dtype)


def _fp16_grad_scale(x: Tensor, g: Tensor) -> Tensor:
    """A power of two ``s`` with ``B * max|x| * max|g| * s`` about :data:`FP16_GRAD_TARGET` (a tensor: no sync).

    Every product sum of ``x^T (s g)`` is then at most that bound, so it cannot overflow fp16, and
    the largest gradient entries sit high in fp16's range instead of among its subnormals.
    """
    bound = x.abs().amax().float().clamp_min(1e-30) * g.abs().amax().clamp_min(1e-30) * x.shape[1]
    return torch.exp2(torch.floor(torch.log2(FP16_GRAD_TARGET / bound)))
