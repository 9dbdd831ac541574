"""ALAE networks ("EncoderDefault" encoder E, "GeneratorDefault" decoder G), written from the spec.

ALAE (Pidhorskyi et al., CVPR 2020) pairs a StyleGAN-like decoder with an encoder that mirrors it.
The modules here are named after the official checkpoint groups (``discriminator_s`` is the encoder,
``generator_s`` the decoder, plus the two mapping networks and ``dlatent_avg``), so that
``ALAE(arch).state_dict()`` has exactly the ``group.param`` keys, shapes and order of the manifests.

Numerics that matter (spec 2.4, fixture README):

- equalised learning rate is *implicit*: stored weights are already scaled, convs and linears are plain;
- encoder: ``from_rgb`` applies leaky ReLU 0.2 and the encoder applies it again (twice in total);
  each block gives two styles from instance statistics (mean, std over H x W) through a linear layer,
  and Z is their sum over all blocks; InstanceNorm eps 1e-5 (torch's default), no affine;
- decoder: per block [upsample, conv, blur], noise, bias, leaky ReLU, InstanceNorm (eps 1e-8),
  style modulation ``x * (1 + s[:C]) + s[C:]``, then conv, noise, bias, leaky ReLU, InstanceNorm,
  modulation; block 0 starts from a ``[1, C, 4, 4]`` constant and has no first conv;
- resampling is nearest-upsample + 3x3 conv (decoder) and 3x3 conv + 2x2 average pool (encoder)
  below 128 px, and one stride-2 conv with a 4x4 kernel built from the 3x3 weights from 128 px on.

Example:
    >>> import torch
    >>> arch = ALAEArch(layer_count=3, startf=4, maxf=16, latent_size=8, mapping_layers=2)
    >>> net = ALAE(arch).eval()
    >>> z, enc = net.encode(torch.zeros(1, 3, 16, 16))
    >>> maps = net.decode(z.repeat(1, 6, 1), constant_noise(arch, seed=0), last_block=2)
    >>> tuple(z.shape), [tuple(m.shape[1:]) for m in maps]
    ((1, 1, 8), [(16, 4, 4), (8, 8, 8), (4, 16, 16)])
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: InstanceNorm eps of the decoder (the encoder uses torch's default 1e-5)
DECODER_NORM_EPS = 1e-8
ENCODER_NORM_EPS = 1e-5
LEAK = 0.2
#: from this resolution on, up/down-sampling is fused into a stride-2 conv
FUSED_FROM = 128


@dataclass(frozen=True)
class ALAEArch:
    """The architecture (the official ``Model`` constructor arguments that shape the network).

    Example:
        >>> a = ALAEArch(layer_count=7, startf=32)
        >>> a.resolution, a.decoder_channels(0), a.decoder_channels(6), a.encoder_channels(0)
        (256, 512, 32, (32, 64))
    """

    layer_count: int
    startf: int
    maxf: int = 512
    latent_size: int = 512
    mapping_layers: int = 8
    #: layers of ``mapping_tl`` (the official Model fixes 3)
    mapping_tl_layers: int = 3
    channels: int = 3

    @property
    def resolution(self) -> int:
        """Input and output size: 4 px doubled ``layer_count - 1`` times."""
        return 2 ** (self.layer_count + 1)

    def decoder_channels(self, i: int) -> int:
        """Output channels of decoder block ``i`` (block 0 at 4 px)."""
        return min(self.maxf, self.startf * 2 ** (self.layer_count - 1 - i))

    def encoder_channels(self, i: int) -> tuple[int, int]:
        """(input, output) channels of encoder block ``i`` (block 0 at full resolution)."""
        return min(self.maxf, self.startf * 2 ** i), min(self.maxf, self.startf * 2 ** (i + 1))

    def decoder_size(self, i: int) -> int:
        """Output size of decoder block ``i`` (4 px, doubling)."""
        return 4 * 2 ** i

    def encoder_size(self, i: int) -> int:
        """Output size of encoder block ``i`` (each block halves)."""
        return self.resolution // 2 ** (i + 1)


def _leaky(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LEAK)


def _instance_stats(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, 2C]``: per-channel mean, then std (biased), over H x W."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True).sqrt()
    return torch.cat((mean, std), dim=1).flatten(1)


def _modulate(x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """AdaIN's affine part: the style's first half scales (around 1), the second half shifts."""
    scale, shift = style.view(style.shape[0], 2, x.shape[1], 1, 1).unbind(1)
    return torch.addcmul(shift, x, scale + 1)


def _four_tap(weight: torch.Tensor) -> torch.Tensor:
    """3x3 kernel -> 4x4 kernel: the sum of its four one-pixel shifts (what nearest x2 + conv equals)."""
    w = F.pad(weight, (1, 1, 1, 1))
    return w[:, :, 1:, 1:] + w[:, :, :-1, 1:] + w[:, :, 1:, :-1] + w[:, :, :-1, :-1]


class Blur(nn.Module):
    """Depthwise [1, 2, 1] x [1, 2, 1] / 16 filter, padding 1; the kernel is a (saved) buffer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16
        self.register_buffer("weight", kernel.expand(channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, padding=1, groups=x.shape[1])


class UpConv(nn.Module):
    """Fused x2 upsampling conv: transposed conv, stride 2, with the 4-tap kernel; weight [in, out, 3, 3]."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(inputs, outputs, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, _four_tap(self.weight), stride=2, padding=1)


class DownConv(nn.Module):
    """Fused conv + 2x2 average pool: stride-2 conv with the 4-tap kernel / 4; weight [out, in, 3, 3]."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, inputs, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, _four_tap(self.weight) * 0.25, stride=2, padding=1)


def _conv3(inputs: int, outputs: int) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, 3, padding=1, bias=False)


class FromRGB(nn.Module):
    """1x1 conv from the image, followed by its own leaky ReLU (the encoder adds a second one)."""

    def __init__(self, channels: int, outputs: int) -> None:
        super().__init__()
        self.from_rgb = nn.Conv2d(channels, outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _leaky(self.from_rgb(x))


class EncodeBlock(nn.Module):
    """conv, leaky, norm -> blur, conv (+pool), leaky, norm; one style from each stage's statistics."""

    def __init__(self, inputs: int, outputs: int, latent: int, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.bias_1 = nn.Parameter(torch.zeros(1, inputs, 1, 1))
        self.bias_2 = nn.Parameter(torch.zeros(1, outputs, 1, 1))
        self.conv_1 = _conv3(inputs, inputs)
        self.blur = Blur(inputs)
        self.conv_2 = DownConv(inputs, outputs) if fused else _conv3(inputs, outputs)
        self.style_1 = nn.Linear(2 * inputs, latent)
        self.style_2 = nn.Linear(2 * outputs, latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (block output, this block's contribution to Z)."""
        x = _leaky(self.conv_1(x) + self.bias_1)
        s1 = self.style_1(_instance_stats(x))
        x = F.instance_norm(x, eps=ENCODER_NORM_EPS)
        x = self.conv_2(self.blur(x))
        if not self.fused:
            x = F.avg_pool2d(x, 2)
        x = _leaky(x + self.bias_2)
        s2 = self.style_2(_instance_stats(x))
        return F.instance_norm(x, eps=ENCODER_NORM_EPS), s1 + s2


class Encoder(nn.Module):
    """E: image [B, C, S, S] in [-1, 1] -> Z [B, 1, latent], the sum of every block's styles."""

    def __init__(self, arch: ALAEArch) -> None:
        super().__init__()
        self.latent_size = arch.latent_size
        self.from_rgb = nn.ModuleList()
        self.encode_block = nn.ModuleList()
        for i in range(arch.layer_count):
            inputs, outputs = arch.encoder_channels(i)
            self.from_rgb.append(FromRGB(arch.channels, inputs))
            fused = arch.resolution // 2 ** i >= FUSED_FROM  # the block's input size
            self.encode_block.append(EncodeBlock(inputs, outputs, arch.latent_size, fused))

    def forward(self, x: torch.Tensor, last_block: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Z and the outputs of blocks 0..``last_block`` (all by default; Z needs them all)."""
        last = len(self.encode_block) - 1 if last_block is None else last_block
        # Full resolution enters through from_rgb[0]; its leaky ReLU plus this one: applied twice.
        x = _leaky(self.from_rgb[0](x))
        z = torch.zeros(x.shape[0], 1, self.latent_size, dtype=x.dtype, device=x.device)
        outputs = []
        for i, block in enumerate(self.encode_block[: last + 1]):
            x, style = block(x)
            z = z + style[:, None]
            outputs.append(x)
        return z, outputs


class DecodeBlock(nn.Module):
    """[upsample, conv, blur], noise, bias, leaky, norm, style; conv, noise, bias, leaky, norm, style."""

    def __init__(self, inputs: int, outputs: int, latent: int, first_conv: bool, fused: bool) -> None:
        super().__init__()
        self.first_conv, self.fused = first_conv, fused
        self.noise_weight_1 = nn.Parameter(torch.zeros(1, outputs, 1, 1))
        self.bias_1 = nn.Parameter(torch.zeros(1, outputs, 1, 1))
        self.noise_weight_2 = nn.Parameter(torch.zeros(1, outputs, 1, 1))
        self.bias_2 = nn.Parameter(torch.zeros(1, outputs, 1, 1))
        if first_conv:
            self.conv_1 = UpConv(inputs, outputs) if fused else _conv3(inputs, outputs)
        self.blur = Blur(outputs)
        self.style_1 = nn.Linear(latent, 2 * outputs)
        self.conv_2 = _conv3(outputs, outputs)
        self.style_2 = nn.Linear(latent, 2 * outputs)

    def _stage(self, x: torch.Tensor, noise: torch.Tensor, noise_weight: torch.Tensor, bias: torch.Tensor,
               style: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(x, noise_weight, noise) + bias
        x = F.instance_norm(_leaky(x), eps=DECODER_NORM_EPS)
        return _modulate(x, style)

    def forward(self, x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, n1: torch.Tensor,
                n2: torch.Tensor) -> torch.Tensor:
        if self.first_conv:
            if not self.fused:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # == repeating each pixel 2x2
            x = self.blur(self.conv_1(x))
        x = self._stage(x, n1, self.noise_weight_1, self.bias_1, self.style_1(s1))
        return self._stage(self.conv_2(x), n2, self.noise_weight_2, self.bias_2, self.style_2(s2))


class ToRGB(nn.Module):
    def __init__(self, inputs: int, channels: int) -> None:
        super().__init__()
        self.to_rgb = nn.Conv2d(inputs, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_rgb(x)


class Decoder(nn.Module):
    """G: styles [B, 2 * layer_count, latent] + noise -> the outputs of decode blocks 0..last."""

    def __init__(self, arch: ALAEArch) -> None:
        super().__init__()
        self.const = nn.Parameter(torch.ones(1, arch.decoder_channels(0), 4, 4))
        self.decode_block = nn.ModuleList()
        inputs = arch.decoder_channels(0)
        for i in range(arch.layer_count):
            outputs = arch.decoder_channels(i)
            fused = i > 0 and arch.decoder_size(i) >= FUSED_FROM
            self.decode_block.append(DecodeBlock(inputs, outputs, arch.latent_size, i > 0, fused))
            inputs = outputs
        self.to_rgb = nn.ModuleList(ToRGB(arch.decoder_channels(i), arch.channels) for i in range(arch.layer_count))

    def forward(self, styles: torch.Tensor, noise: Sequence[torch.Tensor], last_block: int) -> list[torch.Tensor]:
        """``noise[2i]``, ``noise[2i+1]``: the two noise maps of block i, ``[1 or B, 1, H_i, W_i]``.

        The constant has batch size 1, so the first stage of block 0 broadcasts (its noise map is
        shared by the batch in the official code too); the styles bring in the batch.
        """
        x = self.const
        outputs = []
        for i, block in enumerate(self.decode_block[: last_block + 1]):
            x = block(x, styles[:, 2 * i], styles[:, 2 * i + 1], noise[2 * i], noise[2 * i + 1])
            outputs.append(x)
        return outputs


class MappingToLatent(nn.Module):
    """``mapping_tl`` (D's head in training): held for strict loading, unused by the features."""

    def __init__(self, arch: ALAEArch) -> None:
        super().__init__()
        n, latent = arch.mapping_tl_layers, arch.latent_size
        self.map_blocks = nn.ModuleList(nn.Linear(latent, 2 * latent if i == n - 1 else latent) for i in range(n))


class _MappingBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.fc = nn.Linear(inputs, outputs)


class MappingFromLatent(nn.Module):
    """``mapping_fl`` (F, z -> w for sampling): held for strict loading, unused by the features."""

    def __init__(self, arch: ALAEArch) -> None:
        super().__init__()
        latent = arch.latent_size
        self.map_blocks = nn.ModuleList(_MappingBlock(latent, latent) for _ in range(arch.mapping_layers))


class DLatent(nn.Module):
    """``dlatent_avg``: the running mean of w used by truncation (not applied by the demo's encode/decode)."""

    def __init__(self, arch: ALAEArch) -> None:
        super().__init__()
        self.register_buffer("buff", torch.zeros(2 * arch.layer_count, arch.latent_size))


class ALAE(nn.Module):
    """The EMA model groups the demos load, as submodules named like the checkpoint groups.

    Example:
        >>> with torch.device("meta"):
        ...     net = ALAE(ALAEArch(layer_count=7, startf=32))
        >>> len(net.state_dict()), sum(p.numel() for p in net.state_dict().values())
        (191, 42646933)
    """

    def __init__(self, arch: ALAEArch) -> None:
        super().__init__()
        self.arch = arch
        self.discriminator_s = Encoder(arch)
        self.generator_s = Decoder(arch)
        self.mapping_tl_s = MappingToLatent(arch)
        self.mapping_fl_s = MappingFromLatent(arch)
        self.dlatent_avg = DLatent(arch)
        reset_parameters(self)

    def encode(self, x: torch.Tensor, last_block: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The demo's ``encode``: image in [-1, 1] -> (Z [B, 1, latent], encode block outputs)."""
        return self.discriminator_s(x, last_block)

    def decode(self, styles: torch.Tensor, noise: Sequence[torch.Tensor], last_block: int) -> list[torch.Tensor]:
        """Decode block outputs 0..``last_block`` for styles [B, 2 * layer_count, latent]."""
        return self.generator_s(styles, noise, last_block)

    def to_image(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """The image at block ``block``'s resolution from that block's output."""
        return self.generator_s.to_rgb[block](x)


def reset_parameters(net: nn.Module) -> None:
    """The official initialisation: N(0, gain / sqrt(fan_in)) weights (equalised LR stored in the
    weights), zero biases and noise weights, a constant of ones; gain sqrt(2), 1 for the decoder's
    style layers and 0.03 for to_rgb. Only random-init controls depend on it.
    """
    with torch.no_grad():
        for name, module in net.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter):
                continue
            leaf = name.rsplit(".", 1)[-1]
            gain = 0.03 if leaf == "to_rgb" else 1.0 if leaf.startswith("style_") and ".decode_block." in name \
                else math.sqrt(2.0)
            # fan_in = in_channels x kernel area; a transposed conv stores [in, out, k, k].
            fan_in = weight.shape[0] * 9 if isinstance(module, UpConv) else weight[0].numel()
            weight.normal_(0.0, gain / math.sqrt(fan_in))
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def constant_noise(arch: ALAEArch, seed: int) -> list[torch.Tensor]:
    """One ``[1, 1, H, W]`` noise map per decoder stage (block 0 first, two per block), float32 on CPU.

    Drawn in that order from a CPU generator seeded with ``seed``: the values of the official
    ``torch.randn`` calls of one image decoded at batch size 1 after ``torch.manual_seed(seed)``.
    Every image of every batch gets the same maps, so features never depend on batch composition.

    Example:
        >>> [tuple(n.shape) for n in constant_noise(ALAEArch(layer_count=2, startf=4), seed=0)]
        [(1, 1, 4, 4), (1, 1, 4, 4), (1, 1, 8, 8), (1, 1, 8, 8)]
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(1, 1, arch.decoder_size(i // 2), arch.decoder_size(i // 2), generator=gen)
            for i in range(2 * arch.layer_count)]
