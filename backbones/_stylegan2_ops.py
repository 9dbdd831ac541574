"""Resampling, bias/activation and modulated convolution of the StyleGAN2 generator, in plain torch.

Written from the spec's description (section 2.1 and the fixture README), not from the official CUDA ops:
FIR filtering is a depthwise ``conv2d`` with the normalised 2-D filter, x2 upsampling inserts zeros then
filters with gain 4, the upsampling 3x3 convolution is a stride-2 transposed convolution followed by the
filter. Private to :mod:`backbones._stylegan2` (tests monkeypatch these functions for wrong variants).

Example:
    >>> import torch
    >>> f = make_filter([1, 3, 3, 1])
    >>> upsample2d(torch.ones(1, 1, 4, 4), f)[0, 0, 2:6, 2:6]  # constant in, constant out (away from borders)
    tensor([[1., 1., 1., 1.],
            [1., 1., 1., 1.],
            [1., 1., 1., 1.],
            [1., 1., 1., 1.]])
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps the activations' variance through leaky ReLU
DEMOD_EPS = 1e-8


def bias_act(x: torch.Tensor, b: torch.Tensor | None, *, lrelu: bool, gain: float = 1.0,
             clamp: float | None = None) -> torch.Tensor:
    """Add the per-channel bias (dim 1), leaky ReLU 0.2, scale by ``gain``, clamp to +-``clamp``."""
    if b is not None:
        x = x + b.to(x.dtype).reshape(1, -1, *([1] * (x.ndim - 2)))
    if lrelu:
        x = F.leaky_relu(x, LRELU_SLOPE)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def make_filter(taps: Sequence[float]) -> torch.Tensor:
    """The 2-D FIR filter of ``taps`` (outer product), normalised to sum 1."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    f = f[:, None] * f[None, :]
    return f / f.sum()


def fir(x: torch.Tensor, f: torch.Tensor, pad: tuple[int, int, int, int], gain: float) -> torch.Tensor:
    """Pad (x0, x1, y0, y1; negative crops), then filter each channel with ``f * gain`` (a true
    convolution, i.e. the filter flipped for ``conv2d``'s correlation)."""
    x = F.pad(x, [max(p, 0) for p in pad])
    x0, x1, y0, y1 = (max(-p, 0) for p in pad)
    x = x[:, :, y0:x.shape[2] - y1, x0:x.shape[3] - x1]
    k = (f * gain).to(x.dtype).flip([0, 1])
    channels = x.shape[1]
    return F.conv2d(x, k[None, None].expand(channels, 1, *k.shape), groups=channels)


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """x2 upsampling: zeros between samples, then the FIR filter with gain 4 (keeps the mean)."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    fw = f.shape[-1]
    p0, p1 = (fw + 1) // 2, (fw - 2) // 2
    return fir(up, f, (p0, p1, p0, p1), gain=4.0)


def conv_resample(x: torch.Tensor, w: torch.Tensor, *, up: int, padding: int, f: torch.Tensor | None,
                  groups: int) -> torch.Tensor:
    """Convolution, optionally x2 upsampled: a stride-2 transposed convolution (weight used as is)
    followed by the FIR filter, with the padding that makes the output exactly twice the input."""
    if up == 1:
        return F.conv2d(x, w, padding=padding, groups=groups)
    assert f is not None and up == 2
    out_total, in_per_group, kh, kw = w.shape
    fw = f.shape[-1]
    p0 = padding + (fw + up - 1) // 2 - (kw - 1)
    p1 = padding + (fw - up) // 2 - (kw - up)
    pt = max(min(-p0, -p1), 0)  # part of the padding the transposed conv can absorb
    # conv_transpose2d wants [in, out/groups, k, k]: swap in/out within each group
    wt = w.reshape(groups, out_total // groups, in_per_group, kh, kw).transpose(1, 2)
    wt = wt.reshape(groups * in_per_group, out_total // groups, kh, kw)
    x = F.conv_transpose2d(x, wt, stride=up, padding=pt, groups=groups)
    return fir(x, f, (p0 + pt, p1 + pt, p0 + pt, p1 + pt), gain=float(up * up))


def modulated_conv(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, noise: torch.Tensor | None,
                   up: int, padding: int, f: torch.Tensor | None, demodulate: bool, fused: bool) -> torch.Tensor:
    """Weights scaled per sample by ``styles`` over input channels, optionally demodulated (unit L2 norm
    per output channel), then noise added. ``fused``: one grouped conv over the batch."""
    batch = x.shape[0]
    out_c, in_c, kh, kw = weight.shape
    if x.dtype == torch.float16 and demodulate:  # official fp16 path: pre-scale so fp16 cannot overflow
        weight = weight * (1 / math.sqrt(in_c * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    w = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)
    dcoefs = (w.square().sum(dim=[2, 3, 4]) + DEMOD_EPS).rsqrt() if demodulate else None
    if not fused:
        x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
        x = conv_resample(x, weight.to(x.dtype), up=up, padding=padding, f=f, groups=1)
        if dcoefs is not None and noise is not None:
            return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch, -1, 1, 1))
        if dcoefs is not None:
            x = x * dcoefs.to(x.dtype).reshape(batch, -1, 1, 1)
        return x + noise.to(x.dtype) if noise is not None else x
    if dcoefs is not None:
        w = w * dcoefs.reshape(batch, -1, 1, 1, 1)
    x = x.reshape(1, batch * in_c, *x.shape[2:])
    x = conv_resample(x, w.reshape(batch * out_c, in_c, kh, kw).to(x.dtype), up=up, padding=padding, f=f, groups=batch)
    x = x.reshape(batch, out_c, *x.shape[2:])
    # in place, as the official code: with fp16 x the fp32 noise is added before rounding to fp16
    return x.add_(noise) if noise is not None else x
