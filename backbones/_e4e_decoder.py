"""The e4e decoder: a StyleGAN2 generator in rosinality's key layout, in plain torch (spec 2.2).

e4e/pSp checkpoints store their generator under ``decoder.*`` with rosinality's module names:
``style.{1..n_mlp}`` (mapping network), ``input.input`` (the learned 4 x 4 constant), ``conv1`` and
``to_rgb1`` at 4 x 4, then per resolution 8..size two ``convs`` (the first upsamples x2) and one
``to_rgbs`` entry, and the fixed ``noises.noise_<i>`` buffers. The synthesis math is StyleGAN2
config-f; name correspondence with stylegan2-ada: ``input.input`` = ``b4.const``, ``conv1`` =
``b4.conv1``, ``convs.2k`` / ``convs.2k+1`` = ``conv0`` / ``conv1`` of the block at 8 * 2**k.

One styled conv: style = affine(w) (bias initialised to 1); weight modulated by the style and
demodulated (eps 1e-8); 3 x 3 conv (upsampling: stride-2 transposed conv, then the [1, 3, 3, 1] FIR
blur with gain 4); + noise_weight * noise; + bias; leaky ReLU 0.2 times sqrt(2). ``to_rgb`` is a
modulated 1 x 1 conv without demodulation plus a bias, added to the x2-upsampled (FIR, gain 4)
running image. The vendored CUDA kernels of the original are replaced by their plain-torch math.

Example:
    >>> import torch
    >>> g = RosinalityGenerator(size=16, style_dim=8, n_mlp=2, channel_max=8)
    >>> img, maps = g(torch.zeros(1, g.n_styles, 8))
    >>> tuple(img.shape), [m.shape[-1] for m in maps]
    ((1, 3, 16, 16), [4, 4, 8, 8, 16, 16])
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: rosinality's blur / resampling filter (before normalisation)
FIR_TAPS = (1.0, 3.0, 3.0, 1.0)
_SQRT2 = math.sqrt(2.0)


def decoder_channels(size: int, channel_multiplier: int = 2, channel_max: int = 512) -> dict[int, int]:
    """Feature channels per resolution 4..size: 512 up to 32 px, then ``channel_multiplier * 16384 / res``.

    Example:
        >>> decoder_channels(256)
        {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128}
    """
    out: dict[int, int] = {}
    res = 4
    while res <= size:
        # rosinality's table: 512 for res <= 32, 256*m, 128*m, 64*m, 32*m, 16*m for 64..1024.
        out[res] = min(channel_max, 512 if res <= 32 else channel_multiplier * 16384 // res)
        res *= 2
    return out


def fir_kernel(gain: float) -> torch.Tensor:
    """The separable [1, 3, 3, 1] filter as a normalised 4 x 4 kernel times ``gain``.

    Example:
        >>> fir_kernel(4.0).sum().item()
        4.0
    """
    taps = torch.tensor(FIR_TAPS)
    k = taps[:, None] * taps[None, :]
    return k / k.sum() * gain


def upfirdn(x: torch.Tensor, kernel: torch.Tensor, *, up: int, pad: tuple[int, int]) -> torch.Tensor:
    """Zero-insertion upsampling by ``up``, zero padding ``pad`` (before, after) on both axes, then a
    depthwise correlation with the flipped ``kernel`` (rosinality's ``upfirdn2d``, down = 1).

    Example:
        >>> upfirdn(torch.ones(1, 1, 2, 2), fir_kernel(4.0), up=2, pad=(2, 1)).shape
        torch.Size([1, 1, 4, 4])
    """
    b, c, h, w = x.shape
    if up > 1:
        # [h, 1, w, 1] padded to [h, up, w, up]: each sample followed by up-1 zeros on both axes.
        x = F.pad(x.reshape(b, c, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1]).reshape(b, c, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    weight = torch.flip(kernel, [0, 1]).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, groups=c)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weight scaled by ``lr_mul / sqrt(in)`` at run time,
    bias by ``lr_mul``; optionally followed by leaky ReLU 0.2 times sqrt(2) (the mapping network)."""

    def __init__(self, in_dim: int, out_dim: int, *, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activate: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale)
        out = out + self.bias * self.lr_mul
        return F.leaky_relu(out, 0.2) * _SQRT2 if self.activate else out


class PixelNorm(nn.Module):
    """z / RMS(z) over the feature axis (the mapping network's input normalisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class FIRFilter(nn.Module):
    """The stored 4 x 4 FIR ``kernel`` buffer (rosinality ``Blur`` / ``Upsample``) applied by :func:`upfirdn`."""

    def __init__(self, *, up: int, pad: tuple[int, int], gain: float) -> None:
        super().__init__()
        self.register_buffer("kernel", fir_kernel(gain))
        self.up, self.pad = up, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn(x, self.kernel, up=self.up, pad=self.pad)


class ModulatedConv(nn.Module):
    """Style-modulated k x k convolution, one weight per sample (grouped conv); optionally demodulated,
    optionally upsampling x2 (transposed conv, then blur)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, style_dim: int, *, demodulate: bool = True,
                 upsample: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel, kernel))
        if upsample:
            # Transposed conv (k=3, stride 2) gives 2H+1; the 4-tap blur with pad (1, 1) brings it to 2H.
            self.blur = FIRFilter(up=1, pad=(1, 1), gain=4.0)
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.in_ch, self.out_ch, self.kernel = in_ch, out_ch, kernel
        self.demodulate, self.upsample = demodulate, upsample

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b, c, h, wd = x.shape
        style = self.modulation(w).view(b, 1, c, 1, 1)
        weight = self.scale * self.weight * style  # [B, out, in, k, k]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        k = self.kernel
        x = x.reshape(1, b * c, h, wd)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * c, self.out_ch, k, k)
            out = F.conv_transpose2d(x, weight, stride=2, padding=0, groups=b)
            return self.blur(out.view(b, self.out_ch, *out.shape[-2:]))
        out = F.conv2d(x, weight.reshape(b * self.out_ch, c, k, k), padding=k // 2, groups=b)
        return out.view(b, self.out_ch, h, wd)


class NoiseInjection(nn.Module):
    """Adds ``weight * noise`` (one learned scalar; the noise map broadcasts over channels and batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + self.weight * noise


class BiasLeakyReLU(nn.Module):
    """Per-channel bias, leaky ReLU 0.2, times sqrt(2) (rosinality ``FusedLeakyReLU``: key ``bias``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.view(1, -1, 1, 1), 0.2) * _SQRT2


class StyledConv(nn.Module):
    """Modulated 3 x 3 conv, noise, bias + leaky ReLU: equals a stylegan2-ada ``SynthesisLayer``."""

    def __init__(self, in_ch: int, out_ch: int, style_dim: int, *, upsample: bool = False) -> None:
        super().__init__()
        self.conv = ModulatedConv(in_ch, out_ch, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = BiasLeakyReLU(out_ch)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, w), noise))


class ToRGB(nn.Module):
    """Modulated 1 x 1 conv to RGB (no demodulation) + bias, plus the upsampled running image."""

    def __init__(self, in_ch: int, style_dim: int, *, upsample: bool = True) -> None:
        super().__init__()
        if upsample:
            self.upsample = FIRFilter(up=2, pad=(2, 1), gain=4.0)
        self.conv = ModulatedConv(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, w) + self.bias
        return out if skip is None else out + self.upsample(skip)


class ConstantInput(nn.Module):
    """The learned 4 x 4 input (key ``input``), broadcast over the batch."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, 4, 4))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class RosinalityGenerator(nn.Module):
    """StyleGAN2 generator with rosinality's keys: ``Generator(size, style_dim, n_mlp, channel_multiplier)``.

    ``forward(ws)`` synthesises from W+ codes ``[B, n_styles, style_dim]`` (n_styles = 2 log2(size) - 2)
    with the stored noise buffers and returns ``(image, maps)``: maps are the constant then every
    styled conv output (``conv1``, ``convs.0``, ``convs.1``, ...), 2 log2(size) - 2 maps in all.

    Example:
        >>> with torch.device("meta"):
        ...     g = RosinalityGenerator(size=256)
        >>> g.n_styles, len(g.state_dict()), sum(g.channels[r] for r in g.map_resolutions)
        (14, 135, 5888)
    """

    def __init__(self, size: int = 256, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                 channel_max: int = 512, lr_mlp: float = 0.01) -> None:
        super().__init__()
        log_size = int(math.log2(size))
        if size < 4 or 2 ** log_size != size:
            raise ValueError(f"generator size must be a power of two >= 4, got {size}")
        self.size, self.style_dim, self.log_size = size, style_dim, log_size
        self.channels = decoder_channels(size, channel_multiplier, channel_max)
        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activate=True) for _ in range(n_mlp)])
        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(self.channels[4], self.channels[4], style_dim)
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_ch = self.channels[4]
        for i in range(3, log_size + 1):
            out_ch = self.channels[2 ** i]
            self.convs.append(StyledConv(in_ch, out_ch, style_dim, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, style_dim))
            self.to_rgbs.append(ToRGB(out_ch, style_dim))
            in_ch = out_ch
        self.num_layers = 2 * (log_size - 2) + 1
        self.noises = nn.Module()
        for i in range(self.num_layers):
            res = 2 ** ((i + 5) // 2)  # noise_0 at 4 px, then two per resolution
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, res, res))
        self.n_styles = 2 * log_size - 2

    @property
    def map_names(self) -> list[str]:
        """Names of the maps ``forward`` returns: ``const``, ``conv1``, ``convs.0``, ..."""
        return ["const", "conv1"] + [f"convs.{k}" for k in range(len(self.convs))]

    @property
    def map_resolutions(self) -> list[int]:
        """Resolution of each returned map, in order."""
        return [4, 4] + [2 ** (3 + k // 2) for k in range(len(self.convs))]

    def stored_noise(self) -> list[torch.Tensor]:
        """The checkpoint's fixed noise maps ``noises.noise_0..`` (e4e's ``randomize_noise=False``)."""
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z ``[B, style_dim]`` -> w (pixel norm, then the lr-multiplied MLP)."""
        return self.style(z)

    def forward(self, ws: torch.Tensor, noise: Sequence[torch.Tensor] | None = None,
                record: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """W+ ``[B, n_styles, style_dim]`` -> (image ``[B, 3, size, size]``, maps).

        ``noise`` defaults to the stored buffers; ``record`` (if given) receives the running images
        ``to_rgb1``, ``to_rgbs.<k>`` by name.
        """
        if ws.dim() != 3 or ws.shape[1] != self.n_styles or ws.shape[2] != self.style_dim:
            raise ValueError(f"expected W+ codes [B, {self.n_styles}, {self.style_dim}], got {list(ws.shape)}")
        noise = list(self.stored_noise() if noise is None else noise)
        x = self.input(ws.shape[0])
        maps = [x]
        x = self.conv1(x, ws[:, 0], noise[0])
        maps.append(x)
        skip = self.to_rgb1(x, ws[:, 1])
        if record is not None:
            record["to_rgb1"] = skip
        for k, to_rgb in enumerate(self.to_rgbs):
            # Block k uses w rows 2k+1 (upsampling conv), 2k+2 (conv) and 2k+3 (to_rgb).
            x = self.convs[2 * k](x, ws[:, 2 * k + 1], noise[2 * k + 1])
            maps.append(x)
            x = self.convs[2 * k + 1](x, ws[:, 2 * k + 2], noise[2 * k + 2])
            maps.append(x)
            skip = to_rgb(x, ws[:, 2 * k + 3], skip)
            if record is not None:
                record[f"to_rgbs.{k}"] = skip
        return skip, maps
