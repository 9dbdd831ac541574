"""The e4e / pSp encoder: an IR-SE body, a small feature pyramid and one style head per W+ row (spec 2.2).

- ``input_layer``: 3 x 3 conv 3 -> 64 (no bias), BatchNorm, PReLU (one slope per channel).
- ``body``: IR-SE units in 4 stages (IR-SE50: 3, 4, 14, 3 units of 64, 128, 256, 512 channels); the
  first unit of a stage has stride 2. A unit is ``res_layer(x) + shortcut_layer(x)`` with the
  shortcut a 1 x 1 max-pool of stride s when the channels stay, else a strided 1 x 1 conv + BN; the
  residual is BN, 3 x 3 conv, PReLU, 3 x 3 conv of stride s, BN, squeeze-excitation (reduction 16).
- Pyramid: c1, c2, c3 are the last units of stages 2, 3, 4; p2 = up(c3) + latlayer1(c2) and
  p1 = up(p2) + latlayer2(c1), with a bilinear ``align_corners=True`` upsampling (unlike the
  feature sampler).
- ``styles``: heads 0-2 read c3, 3-6 read p2, 7+ read p1; each is log2(16 | 32 | 64) stride-2 3 x 3
  convs with leaky ReLU slope 0.01 (torch's default, not StyleGAN's 0.2), then an equalised linear.
- Codes: e4e (``Encoder4Editing``) returns head 0 repeated with head i added to row i (all deltas
  at inference); pSp (``GradualStyleEncoder``) returns the heads' outputs as they are.

BatchNorm runs in eval mode (running statistics).

Example:
    >>> import torch
    >>> enc = E4EEncoder(n_styles=8, stage_units=(1, 1, 1, 1), stage_channels=(16, 16, 32, 32), style_dim=16)
    >>> enc.eval()(torch.zeros(2, 3, 32, 32), heads=True)["codes_raw"].shape
    torch.Size([2, 8, 16])
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones._e4e_decoder import EqualLinear

#: the pyramid's upsampling (the official ``_upsample_add``); a module constant so tests can swap it
FPN_UPSAMPLE: dict[str, Any] = {"mode": "bilinear", "align_corners": True}
#: squeeze-excitation channel reduction of every IR-SE unit
SE_REDUCTION = 16
#: first head reading p2 / p1 (e4e's ``coarse_ind`` / ``middle_ind``) and the heads' nominal sizes
COARSE_END, MIDDLE_END = 3, 7
HEAD_SIZES = (16, 32, 64)
ENCODER_TYPES = ("Encoder4Editing", "GradualStyleEncoder")


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean over H, W)))) with 1 x 1 convs, no bias (keys ``fc1``, ``fc2``)."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class IRSEUnit(nn.Module):
    """One IR-SE bottleneck unit (``shortcut_layer`` is registered first: it comes first in the checkpoint)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if in_ch == out_ch:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_ch), nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False), nn.PReLU(out_ch),
            nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), SqueezeExcite(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class StyleHead(nn.Module):
    """log2(size) stride-2 3 x 3 convs, each + leaky ReLU 0.01, down to 1 x 1; then an equalised linear."""

    def __init__(self, in_ch: int, out_ch: int, size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(int(math.log2(size))):
            layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_ch, out_ch)
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        if x.shape[-2:] != (1, 1):
            # The official head flattens with view(-1, C), which silently mixes pixels into the batch.
            raise ValueError(f"style head ends at {tuple(x.shape[-2:])} instead of 1 x 1: the encoder input "
                             f"is too large for its heads (at most 256 px for e4e)")
        return self.linear(x.flatten(1))


def upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The pyramid step: x upsampled to y's size (:data:`FPN_UPSAMPLE`), plus y."""
    return F.interpolate(x, size=y.shape[-2:], **FPN_UPSAMPLE) + y


class E4EEncoder(nn.Module):
    """``Encoder4Editing(50, 'ir_se')`` / ``GradualStyleEncoder`` with e4e's keys, for any stage layout.

    ``forward(x, fpn=..., heads=...)`` returns a dict of named activations: ``input_layer``,
    ``body`` (list of unit outputs), ``c1``, ``c2``, ``c3``; with ``fpn`` also ``latlayer1``,
    ``latlayer2``, ``p2``, ``p1``; with ``heads`` also ``styles`` (list) and ``codes_raw``
    ``[B, n_styles, style_dim]``.

    Example:
        >>> with torch.device("meta"):
        ...     enc = E4EEncoder(n_styles=14)
        >>> len(enc.state_dict()), enc.taps
        (565, (6, 20, 23))
    """

    def __init__(self, n_styles: int = 14, stage_units: Sequence[int] = (3, 4, 14, 3),
                 stage_channels: Sequence[int] = (64, 128, 256, 512), style_dim: int = 512,
                 encoder_type: str = "Encoder4Editing") -> None:
        super().__init__()
        if encoder_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_type must be one of {ENCODER_TYPES}, got {encoder_type!r}")
        units, chans = list(stage_units), list(stage_channels)
        if len(units) != 4 or len(chans) != 4 or min(units) < 1:
            raise ValueError(f"the IR-SE body has 4 stages of >= 1 unit; got units {units}, channels {chans}")
        self.n_styles, self.style_dim, self.encoder_type = n_styles, style_dim, encoder_type
        self.input_layer = nn.Sequential(nn.Conv2d(3, chans[0], 3, 1, 1, bias=False), nn.BatchNorm2d(chans[0]),
                                         nn.PReLU(chans[0]))
        body: list[nn.Module] = []
        in_ch = chans[0]
        for n, ch in zip(units, chans):
            body += [IRSEUnit(in_ch, ch, 2)] + [IRSEUnit(ch, ch, 1) for _ in range(n - 1)]
            in_ch = ch
        self.body = nn.Sequential(*body)
        ends = [sum(units[: i + 1]) - 1 for i in range(4)]
        self.taps = (ends[1], ends[2], ends[3])  # c1, c2, c3: 6, 20, 23 for IR-SE50
        self.styles = nn.ModuleList(
            StyleHead(chans[3], style_dim, HEAD_SIZES[0 if i < COARSE_END else 1 if i < MIDDLE_END else 2])
            for i in range(n_styles))
        self.latlayer1 = nn.Conv2d(chans[2], chans[3], 1)
        self.latlayer2 = nn.Conv2d(chans[1], chans[3], 1)
        self.channels = {"c1": chans[1], "c2": chans[2], "c3": chans[3], "p2": chans[3], "p1": chans[3]}

    def forward(self, x: torch.Tensor, *, fpn: bool = False, heads: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        x = self.input_layer(x)
        out["input_layer"] = x
        body = []
        for unit in self.body:
            x = unit(x)
            body.append(x)
        out["body"] = body
        c1, c2, c3 = (body[i] for i in self.taps)
        out.update(c1=c1, c2=c2, c3=c3)
        n = self.n_styles
        # The official encoder builds p2 / p1 only when a head reads them; the FPN feature set always needs them.
        if fpn or (heads and n > COARSE_END):
            out["latlayer1"] = self.latlayer1(c2)
            out["p2"] = upsample_add(c3, out["latlayer1"])
        if fpn or (heads and n > MIDDLE_END):
            out["latlayer2"] = self.latlayer2(c1)
            out["p1"] = upsample_add(out["p2"], out["latlayer2"])
        if heads:
            sources = [c3 if i < COARSE_END else out["p2"] if i < MIDDLE_END else out["p1"] for i in range(n)]
            styles = [head(src) for head, src in zip(self.styles, sources)]
            out["styles"] = styles
            if self.encoder_type == "Encoder4Editing":
                # w0 for every row, plus head i's delta on row i (ProgressiveStage.Inference: all deltas).
                deltas = torch.stack([torch.zeros_like(styles[0])] + styles[1:], dim=1)
                out["codes_raw"] = styles[0].unsqueeze(1) + deltas
            else:
                out["codes_raw"] = torch.stack(styles, dim=1)
        return out
