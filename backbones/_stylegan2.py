"""StyleGAN2-ADA generator (mapping + synthesis) in plain PyTorch, for any configuration.

Written from the behaviour described in the baselines spec (section 2.1) and the fixture README, not from
the official code. ``state_dict()`` keys, order, shapes and dtypes equal the official ``G_ema`` of
NVlabs/stylegan2-ada-pytorch (architecture ``skip``); no custom CUDA ops (the FIR resampling, bias +
activation and modulated convolutions are ordinary torch ops in :mod:`backbones._stylegan2_ops`), so it
also runs on CPU and on ``meta``. Checked against the official code's outputs to 1.1e-5
(``tests/test_stylegan2.py``, fixture ``tests/fixtures/stylegan2ada``).

Public API (used by DatasetGAN and GAN inversion):

- ``Generator(**init_kwargs)`` with the official constructor arguments (``z_dim, c_dim, w_dim,
  img_resolution, img_channels, mapping_kwargs, synthesis_kwargs``), e.g. the ``init_kwargs`` returned by
  :func:`load_stylegan2_pkl`;
- ``G.mapping(z, c=None, truncation_psi=1.0, truncation_cutoff=None) -> ws [B, num_ws, w_dim]``;
- ``G.synthesis(ws, noise_mode="const", return_features=True, force_fp32=True) -> (img, maps)``: ``img``
  is raw (no tanh/clamp, about [-1, 1]); ``maps`` is ``synthesis.b4.const`` broadcast to the batch, then
  every SynthesisLayer output in order (``b4.conv1, b8.conv0, b8.conv1, ...``), float32, at native
  resolution (14 maps, 5888 channels for config-f at 256; 4992 for paper256). With
  ``return_features=False`` only ``img`` is returned;
- ``G.synthesis.feature_info`` (also ``G.feature_info``): ``FeatureInfo(name, channels, stride)`` per map,
  ``stride = img_resolution // map resolution``;
- ``G(z, c=None, truncation_psi=1.0, truncation_cutoff=None, noise_mode="const") -> img``;
- :func:`load_stylegan2_pkl` (``path -> (init_kwargs, state_dict)``) and :func:`load_generator`
  (``path -> Generator`` in eval mode) read training-loop snapshot pickles safely.

Numerics (decision D14): float32 everywhere by default; ``force_fp32=False`` runs the blocks that the
checkpoint's ``num_fp16_res`` marks in float16, as the official code does (also on CPU); noise
``'const'`` (the stored ``noise_const`` times ``noise_strength``) by default, ``'random'`` or ``'none'``
on request; ``conv_clamp`` is applied in both precisions. Supported: architecture ``skip`` (all official
generators), activation ``lrelu``; other values raise :class:`~bench.errors.BenchError`.

Example:
    >>> import torch
    >>> G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3,
    ...               synthesis_kwargs={"channel_base": 64, "channel_max": 16}).eval()
    >>> ws = G.mapping(torch.randn(2, 8), truncation_psi=0.7, truncation_cutoff=2)
    >>> img, maps = G.synthesis(ws)
    >>> tuple(ws.shape), tuple(img.shape), [m.shape[1] for m in maps]
    ((2, 4, 8), (2, 3, 8, 8), [16, 16, 8, 8])
    >>> [f.name for f in G.feature_info]
    ['synthesis.b4.const', 'synthesis.b4.conv1', 'synthesis.b8.conv0', 'synthesis.b8.conv1']
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from backbones import _stylegan2_ops as ops
from bench.contract import FeatureInfo
from bench.errors import BenchError, CheckpointError

__all__ = ["Generator", "MappingNetwork", "SynthesisNetwork", "load_stylegan2_pkl", "load_generator"]

_NOISE_MODES = ("const", "random", "none")


def _check_activation(activation: str, owner: str) -> None:
    if activation not in ("lrelu", "linear"):
        raise BenchError(f"StyleGAN2 {owner} activation {activation!r} is not supported; use 'lrelu' or 'linear'")


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalised learning rate: weight stored / ``lr_multiplier``, used x lr/sqrt(in)."""

    def __init__(self, in_features: int, out_features: int, *, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0) -> None:
        super().__init__()
        _check_activation(activation, "layer")
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.activation = activation
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain
        if self.activation == "linear":
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return ops.bias_act(x.matmul(w.t()), b, lrelu=True, gain=ops.LRELU_GAIN)


class MappingNetwork(nn.Module):
    """z (and the class label c) -> w, broadcast to ``num_ws`` rows, optionally truncated."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None, *, num_layers: int = 8,
                 embed_features: int | None = None, layer_features: int | None = None, activation: str = "lrelu",
                 lr_multiplier: float = 0.01, w_avg_beta: float | None = 0.995, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise BenchError(f"unknown StyleGAN2 mapping_kwargs: {', '.join(sorted(unknown))}")
        self.z_dim, self.c_dim, self.w_dim, self.num_ws, self.num_layers = z_dim, c_dim, w_dim, num_ws, num_layers
        embed_features = (w_dim if c_dim else 0) if embed_features is None else embed_features
        layer_features = w_dim if layer_features is None else layer_features
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        for i in range(num_layers):
            self.add_module(f"fc{i}", FullyConnectedLayer(features[i], features[i + 1], activation=activation,
                                                          lr_multiplier=lr_multiplier))
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: torch.Tensor | None, c: torch.Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None) -> torch.Tensor:
        x = ops.normalize_2nd_moment(z.to(torch.float32)) if self.z_dim > 0 else None
        if self.c_dim > 0:
            if c is None:
                raise BenchError(f"this StyleGAN2 generator is conditional (c_dim={self.c_dim}): pass c")
            y = ops.normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if self.num_ws is None:
            return x
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            if not hasattr(self, "w_avg"):
                raise BenchError("truncation needs mapping.w_avg, which this generator does not have")
            cut = self.num_ws if truncation_cutoff is None else truncation_cutoff
            x = torch.cat([self.w_avg.lerp(x[:, :cut], truncation_psi), x[:, cut:]], dim=1)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (x2 upsampled when ``up`` is 2), + noise, + bias, leaky ReLU x sqrt(2), clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu",
                 resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: float | None = None,
                 channels_last: bool = False) -> None:
        super().__init__()
        if activation != "lrelu":
            raise BenchError(f"StyleGAN2 synthesis activation {activation!r} is not supported; use 'lrelu'")
        self.resolution, self.up, self.use_noise, self.conv_clamp = resolution, up, use_noise, conv_clamp
        self.padding = kernel_size // 2
        self.act_gain = ops.LRELU_GAIN
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        # registration order = the official state_dict order: weight, noise_strength, bias, then buffers
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        if use_noise:
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.register_buffer("resample_filter", ops.make_filter(resample_filter))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, *, noise_mode: str, fused: bool,
                generator: torch.Generator | None = None) -> torch.Tensor:
        noise = None
        if self.use_noise and noise_mode == "random":
            size = [x.shape[0], 1, self.resolution, self.resolution]
            noise = torch.randn(size, device=x.device, generator=generator) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = ops.modulated_conv(x, self.weight, self.affine(w), noise=noise, up=self.up, padding=self.padding,
                            f=self.resample_filter, demodulate=True, fused=fused)
        return ops.bias_act(x, self.bias, lrelu=True, gain=self.act_gain, clamp=self.conv_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv to image channels; styles x 1/sqrt(in), no demodulation, bias, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, *, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, *, fused: bool) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = ops.modulated_conv(x, self.weight, styles, noise=None, up=1, padding=0, f=None, demodulate=False, fused=fused)
        return ops.bias_act(x, self.bias, lrelu=False, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution: (const | conv0 up x2), conv1, torgb; the skip image is upsampled and summed."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int, *,
                 use_fp16: bool, resample_filter: Sequence[float], conv_clamp: float | None,
                 layer_kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.resolution, self.use_fp16 = in_channels, out_channels, resolution, use_fp16
        self.num_conv, self.num_torgb = (1 if in_channels == 0 else 2), 1
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        self.register_buffer("resample_filter", ops.make_filter(resample_filter))
        common = dict(w_dim=w_dim, resolution=resolution, resample_filter=resample_filter, conv_clamp=conv_clamp,
                      **layer_kwargs)
        if in_channels != 0:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=2, **common)
        self.conv1 = SynthesisLayer(out_channels, out_channels, **common)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, *, noise_mode: str,
                force_fp32: bool, fused_modconv: bool | None, maps: list[torch.Tensor] | None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.float16 if self.use_fp16 and not force_fp32 else torch.float32
        fused = fused_modconv
        if fused is None:  # as the official default: grouped conv unless fp16 with a batch > 1
            fused = not self.training and (dtype == torch.float32 or ws.shape[0] == 1)
        kw = dict(noise_mode=noise_mode, fused=fused, generator=generator)
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
            if maps is not None:
                maps.append(x.float())
            x = self.conv1(x, ws[:, 0], **kw)
        else:
            x = self.conv0(x.to(dtype), ws[:, 0], **kw)
            if maps is not None:
                maps.append(x.float())
            x = self.conv1(x, ws[:, 1], **kw)
        if maps is not None:
            maps.append(x.float())
        if img is not None:
            img = ops.upsample2d(img, self.resample_filter)
        # ToRGB reads the row after this block's convs, i.e. the same w as the next block's conv0
        y = self.torgb(x, ws[:, self.num_conv], fused=fused).to(torch.float32)
        return x, (img + y if img is not None else y)


class SynthesisNetwork(nn.Module):
    """Blocks b4 ... b{img_resolution}; block ``bR`` reads ws rows ``[i, i + num_conv]`` (i advanced by
    num_conv per block), so ``num_ws`` = number of SynthesisLayers + 1."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, *, channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 0, architecture: str = "skip",
                 resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: float | None = None,
                 fp16_channels_last: bool = False, **layer_kwargs: Any) -> None:
        super().__init__()
        log2 = int(math.log2(img_resolution)) if img_resolution >= 4 else 0
        if img_resolution < 4 or 2 ** log2 != img_resolution:
            raise BenchError(f"StyleGAN2 img_resolution must be a power of two >= 4, got {img_resolution}")
        if architecture != "skip":
            raise BenchError(f"StyleGAN2 synthesis architecture {architecture!r} is not supported; only 'skip'")
        unknown = set(layer_kwargs) - {"kernel_size", "use_noise", "activation", "channels_last"}
        if unknown:
            raise BenchError(f"unknown StyleGAN2 synthesis_kwargs: {', '.join(sorted(unknown))}")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2 ** i for i in range(2, log2 + 1)]
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim, res, img_channels,
                                   use_fp16=res >= fp16_resolution, resample_filter=resample_filter,
                                   conv_clamp=conv_clamp, layer_kwargs=layer_kwargs)
            self.add_module(f"b{res}", block)
            self.num_ws += block.num_conv
        self.num_ws += 1  # the last block's ToRGB

    @property
    def feature_info(self) -> list[FeatureInfo]:
        """``synthesis.b4.const`` then every SynthesisLayer, in the order ``forward`` returns them."""
        out = [FeatureInfo("synthesis.b4.const", self.b4.out_channels, self.img_resolution // 4)]
        for block in self.blocks():
            names = ["conv1"] if block.in_channels == 0 else ["conv0", "conv1"]
            out += [FeatureInfo(f"synthesis.b{block.resolution}.{n}", block.out_channels,
                                self.img_resolution // block.resolution) for n in names]
        return out

    def blocks(self) -> list[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.block_resolutions]

    def _split_ws(self, ws: torch.Tensor) -> list[torch.Tensor]:
        out, i = [], 0
        for block in self.blocks():
            out.append(ws.narrow(1, i, block.num_conv + block.num_torgb))
            i += block.num_conv
        return out

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", return_features: bool = True,
                force_fp32: bool = True, fused_modconv: bool | None = None,
                generator: torch.Generator | None = None) -> Any:
        if noise_mode not in _NOISE_MODES:
            raise BenchError(f"noise_mode must be one of {', '.join(_NOISE_MODES)}, got {noise_mode!r}")
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise BenchError(f"ws must have shape [B, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        ws = ws.to(torch.float32)
        maps: list[torch.Tensor] | None = [] if return_features else None
        x = img = None
        for block, block_ws in zip(self.blocks(), self._split_ws(ws)):
            x, img = block(x, img, block_ws, noise_mode=noise_mode, force_fp32=force_fp32,
                           fused_modconv=fused_modconv, maps=maps, generator=generator)
        return (img, maps) if return_features else img


class Generator(nn.Module):
    """Mapping + synthesis; constructor arguments as the official ``Generator`` (see module docstring)."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 mapping_kwargs: Mapping[str, Any] | None = None,
                 synthesis_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, **dict(synthesis_kwargs or {}))
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, **dict(mapping_kwargs or {}))

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return self.synthesis.feature_info

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: str = "const", force_fp32: bool = True) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, return_features=False, force_fp32=force_fp32)


def load_stylegan2_pkl(path: str | Path, key: str = "G_ema") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(init_kwargs, state_dict)`` of network ``key`` in a stylegan2-ada-pytorch snapshot pickle, read
    without executing anything from it (see :mod:`backbones._stylegan2_pickle`); ``Generator(**init_kwargs)``
    takes the state dict strictly.

    Example:
        >>> load_stylegan2_pkl("missing.pkl", key="G")
        Traceback (most recent call last):
        bench.errors.CheckpointError: StyleGAN2 pickle not found: missing.pkl
    """
    from backbones._stylegan2_pickle import load_network_record, record_init_kwargs, record_state_dict

    record = load_network_record(path, key)
    return record_init_kwargs(record, source=str(path)), record_state_dict(record)


def load_generator(path: str | Path, *, key: str = "G_ema", device: str = "cpu") -> Generator:
    """The generator stored under ``key`` in a snapshot pickle, built from its own ``init_kwargs``,
    loaded strictly, in eval mode.

    Example:
        >>> load_generator("missing.pkl")
        Traceback (most recent call last):
        bench.errors.CheckpointError: StyleGAN2 pickle not found: missing.pkl
    """
    from bench.checkpoints import load_strict

    init_kwargs, state_dict = load_stylegan2_pkl(path, key)
    try:  # built on the CPU: meta would skip the random init, but its first use imports ~900 modules (~4 s)
        G = Generator(**init_kwargs)
    except (TypeError, BenchError) as err:  # arguments this implementation does not know or support
        raise CheckpointError(f"StyleGAN2 pickle {path}: cannot build its generator ({err})") from err
    load_strict(G, state_dict, source=str(path))
    return G.to(device).eval().requires_grad_(False)
