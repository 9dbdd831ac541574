"""The VDVAE network (openai/vdvae layout), written from the benchmark spec (baselines.md section 2.3).

A hierarchical VAE: a bottleneck-ResNet encoder that average-pools its way from the image size down to
1 x 1, and a top-down decoder whose blocks each sample a latent from a posterior computed from the
decoder state and the encoder activation of the same resolution. The module tree mirrors the official
one so that the official state dicts (``encoder.*``, ``decoder.*``) load strictly, in the same key
order. Private to ``backbones``; :mod:`backbones.vdvae` is the plugin.

Hyper-parameters use the official names (``width``, ``zdim``, ``enc_blocks``, ...). Block strings are
comma lists of ``RxN`` (N blocks at resolution R), ``RdK`` (one block at R, then average-pool by K),
``RmM`` (decoder: one block at R that first adds the state of resolution M, nearest-upsampled) or ``R``.

Example:
    >>> from backbones.vdvae import TINY_HPARAMS
    >>> hp = VDVAEHparams.from_dict(TINY_HPARAMS)
    >>> hp.enc_layers()[:3], hp.dec_layers()[:2]
    ([(32, None), (32, 4), (8, None)], [(1, None), (2, 1)])
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError

#: ``ffhq_256`` input normalisation of the official data pipeline: x = (v + SHIFT) * SCALE
FFHQ256_SHIFT = -112.8666757481
FFHQ256_SCALE = 1 / 69.84780273
#: the dataset names whose preprocessing constants we know
PREPROCESSING = {"ffhq_256": (FFHQ256_SHIFT, FFHQ256_SCALE)}

#: official hyper-parameters that only concern training: accepted in ``arch`` and ignored
TRAINING_ONLY = frozenset({"ema_rate", "lr", "wd", "warmup_iters", "grad_clip", "skip_threshold", "n_batch",
                           "num_epochs", "adam_beta1", "adam_beta2"})

#: The nonlinearity before every conv: exact (erf) GELU. Module-level so a test can swap in a wrong one.
_act = F.gelu
#: How a mix-in block upsamples the lower-resolution state (nearest: F.interpolate's default).
MIXIN_MODE = "nearest"


def parse_blocks(text: str, *, what: str, extra: str) -> list[tuple[int, int | None]]:
    """``"4x2,4d4,1"`` -> ``[(4, None), (4, None), (4, 4), (1, None)]``; ``extra`` is ``"d"`` or ``"m"``.

    Example:
        >>> parse_blocks("1x2,4m1", what="dec_blocks", extra="m")
        [(1, None), (1, None), (4, 1)]
    """
    if not isinstance(text, str) or not text.strip():
        raise BenchError(f"vdvae {what} must be a non-empty block string such as '4x2,4{extra}4', got {text!r}")
    layers: list[tuple[int, int | None]] = []
    for item in text.split(","):
        item = item.strip()
        head, sep, tail = item.partition("x") if "x" in item else item.partition(extra)
        if not head.isdigit() or (sep and not tail.isdigit()) or int(head) < 1 or (sep and int(tail) < 1):
            raise BenchError(f"vdvae {what} item {item!r} is not R, RxN or R{extra}K (positive integers)")
        res = int(head)
        if sep == "x":
            layers += [(res, None)] * int(tail)
        else:
            layers.append((res, int(tail) if sep else None))
    return layers


def parse_widths(text: str, width: int) -> dict[int, int]:
    """``custom_width_str`` (``"res:width,..."``) -> the widths it overrides; others are ``width``.

    Example:
        >>> parse_widths("8:64,4:64", 32)
        {8: 64, 4: 64}
    """
    out: dict[int, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        res, sep, w = item.strip().partition(":")
        if not (sep and res.isdigit() and w.isdigit() and int(w) > 0):
            raise BenchError(f"vdvae custom_width_str item {item!r} is not 'resolution:width'")
        out[int(res)] = int(w)
    return out


@dataclass(frozen=True)
class VDVAEHparams:
    """The architecture hyper-parameters (official names), validated.

    Example:
        >>> from backbones.vdvae import FFHQ256_HPARAMS
        >>> VDVAEHparams.from_dict(FFHQ256_HPARAMS).width_at(64)
        512
    """

    width: int
    zdim: int
    bottleneck_multiple: float
    custom_width_str: str
    no_bias_above: int
    num_mixtures: int
    enc_blocks: str
    dec_blocks: str
    image_size: int
    image_channels: int = 3
    dataset: str = "ffhq_256"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VDVAEHparams":
        """Build from a complete mapping of official names (training-only names are ignored)."""
        names = [f for f in cls.__dataclass_fields__]
        unknown = sorted(set(values) - set(names) - TRAINING_ONLY)
        if unknown:
            raise BenchError(f"vdvae arch has unknown key(s) {unknown}; known: {sorted(names)}")
        missing = [n for n in names if n not in values and n not in ("image_channels", "dataset")]
        if missing:
            raise BenchError(f"vdvae arch lacks {missing}")
        kwargs = {n: values[n] for n in names if n in values}
        for n in ("width", "zdim", "no_bias_above", "num_mixtures", "image_size", "image_channels"):
            if n in kwargs and (isinstance(kwargs[n], bool) or not isinstance(kwargs[n], int)):
                raise BenchError(f"vdvae arch {n} must be an integer, got {kwargs[n]!r}")
        hp = cls(**kwargs)
        hp.validate()
        return hp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def width_at(self, res: int) -> int:
        return parse_widths(self.custom_width_str, self.width).get(res, self.width)

    def middle(self, res: int) -> int:
        """Bottleneck width of the blocks at ``res`` (the official int() truncation)."""
        return int(self.width_at(res) * self.bottleneck_multiple)

    def enc_layers(self) -> list[tuple[int, int | None]]:
        return parse_blocks(self.enc_blocks, what="enc_blocks", extra="d")

    def dec_layers(self) -> list[tuple[int, int | None]]:
        return parse_blocks(self.dec_blocks, what="dec_blocks", extra="m")

    def enc_resolutions(self) -> list[int]:
        """Resolutions of the encoder's activation dict, descending (the image size first)."""
        out = [self.image_size]
        for res, down in self.enc_layers():
            if down and res // down not in out:
                out.append(res // down)
        return out

    def dec_resolutions(self) -> list[int]:
        """Resolutions of the decoder state dict, ascending."""
        return sorted({res for res, _ in self.dec_layers()})

    def validate(self) -> None:
        """Refuse a configuration the official network cannot run, with the offending item."""
        for n in ("width", "zdim", "num_mixtures", "image_size", "image_channels"):
            if getattr(self, n) < 1:
                raise BenchError(f"vdvae arch {n} must be positive, got {getattr(self, n)}")
        if self.dataset not in PREPROCESSING:
            raise BenchError(f"vdvae arch dataset {self.dataset!r}: its preprocessing constants are unknown; "
                             f"known: {sorted(PREPROCESSING)}")
        res = self.image_size
        for block, (r, down) in enumerate(self.enc_layers()):
            if r != res:
                raise BenchError(f"vdvae enc_blocks: block {block} is declared at {r} but runs at {res}")
            if self.middle(r) < 1:
                raise BenchError(f"vdvae arch: bottleneck width int({self.width_at(r)} * {self.bottleneck_multiple}) "
                                 f"at resolution {r} is 0")
            if down:
                if res % down:
                    raise BenchError(f"vdvae enc_blocks: {r}d{down} does not divide resolution {r}")
                res //= down
                if self.width_at(res) < self.width_at(r):
                    raise BenchError(f"vdvae arch: width {self.width_at(res)} at {res} is below {self.width_at(r)} "
                                     f"at {r}; the encoder can only pad channels")
        if self.width_at(self.image_size) != self.width:
            raise BenchError(f"vdvae arch: custom width at the image size must equal width {self.width}")
        available = {r for r in self.dec_resolutions() if r <= self.no_bias_above}
        for block, (r, mixin) in enumerate(self.dec_layers()):
            if r not in self.enc_resolutions():
                raise BenchError(f"vdvae dec_blocks: block {block} at {r} has no encoder activation of that "
                                 f"resolution ({self.enc_resolutions()})")
            if mixin is not None and (mixin not in available or r % mixin or mixin >= r
                                      or self.width_at(mixin) < self.width_at(r)):
                raise BenchError(f"vdvae dec_blocks: {r}m{mixin} needs a state computed earlier, at a resolution "
                                 f"dividing {r} and at least as wide")
            available.add(r)
        if self.image_size not in self.dec_resolutions():
            raise BenchError(f"vdvae dec_blocks never reach the image size {self.image_size}")


def _conv(cin: int, cout: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, padding=kernel // 2)


class Block(nn.Module):
    """Bottleneck block: GELU then conv, four times (1x1, 3x3, 3x3, 1x1; 1x1 only at res <= 2),
    an optional residual add, then an optional average pool."""

    def __init__(self, cin: int, middle: int, cout: int, *, use_3x3: bool, residual: bool,
                 down_rate: int | None = None) -> None:
        super().__init__()
        k = 3 if use_3x3 else 1
        self.c1, self.c2, self.c3, self.c4 = _conv(cin, middle, 1), _conv(middle, middle, k), \
            _conv(middle, middle, k), _conv(middle, cout, 1)
        self.residual, self.down_rate = residual, down_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c4(_act(self.c3(_act(self.c2(_act(self.c1(_act(x))))))))
        out = x + h if self.residual else h
        return F.avg_pool2d(out, self.down_rate) if self.down_rate else out


class Encoder(nn.Module):
    """3x3 stem, then the blocks; returns the LAST activation at each resolution (res -> map)."""

    def __init__(self, hp: VDVAEHparams) -> None:
        super().__init__()
        self.hp = hp
        self.in_conv = _conv(hp.image_channels, hp.width, 3)
        self.enc_blocks = nn.ModuleList(
            Block(hp.width_at(r), hp.middle(r), hp.width_at(r), use_3x3=r > 2, residual=True, down_rate=d)
            for r, d in hp.enc_layers())

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        x = self.in_conv(x)
        acts = {x.shape[-1]: x}
        for block in self.enc_blocks:
            x = block(x)
            width = self.hp.width_at(x.shape[-1])
            if x.shape[1] < width:  # a wider next resolution: zero channels appended
                x = F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1]))
            acts[x.shape[-1]] = x  # later blocks of a resolution overwrite earlier ones
        return acts


class DecBlock(nn.Module):
    """One top-down step: posterior q(z | state, encoder act), prior p(z | state), z, residual block."""

    def __init__(self, hp: VDVAEHparams, res: int, mixin: int | None) -> None:
        super().__init__()
        width, middle, zdim, use_3x3 = hp.width_at(res), hp.middle(res), hp.zdim, res > 2
        self.res, self.mixin, self.zdim = res, mixin, zdim
        self.enc = Block(2 * width, middle, 2 * zdim, use_3x3=use_3x3, residual=False)
        self.prior = Block(width, middle, 2 * zdim + width, use_3x3=use_3x3, residual=False)
        self.z_proj = _conv(zdim, width, 1)
        self.resnet = Block(width, middle, width, use_3x3=use_3x3, residual=True)

    def forward(self, xs: dict[int, torch.Tensor], acts: dict[int, torch.Tensor],
                eps: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Update ``xs[res]`` in place; ``eps=None`` takes the posterior mean. Returns the block's stats."""
        a = acts[self.res]
        x = xs.get(self.res)
        x = torch.zeros_like(a) if x is None else x.expand(a.shape[0], -1, -1, -1)  # bias_xs have batch 1
        if self.mixin is not None:
            low = xs[self.mixin][:, :x.shape[1]]
            x = x + F.interpolate(low, scale_factor=self.res // self.mixin, mode=MIXIN_MODE)
        qm, qv = self.enc(torch.cat([x, a], dim=1)).chunk(2, dim=1)  # qv: log standard deviation
        prior = self.prior(x)
        z = self.zdim
        pm, pv, x = prior[:, :z], prior[:, z:2 * z], x + prior[:, 2 * z:]
        latent = qm if eps is None else torch.exp(qv) * eps + qm
        x = self.resnet(x + self.z_proj(latent))
        xs[self.res] = x
        return {"qm": qm, "qv": qv, "pm": pm, "pv": pv, "z": latent}


def gaussian_kl(qm: torch.Tensor, qv: torch.Tensor, pm: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """KL(N(qm, e^qv) || N(pm, e^pv)) elementwise, with qv, pv log standard deviations.

    Example:
        >>> gaussian_kl(*(torch.zeros(1),) * 4).item()
        0.0
    """
    return pv - qv - 0.5 + 0.5 * (torch.exp(2 * qv) + (qm - pm) ** 2) / torch.exp(2 * pv)


class DmolHead(nn.Module):
    """The output 1x1 conv to the mixture-of-logistics parameters (unused by the features)."""

    def __init__(self, width: int, num_mixtures: int) -> None:
        super().__init__()
        self.out_conv = _conv(width, num_mixtures * 10, 1)

    def forward(self, px_z: torch.Tensor) -> torch.Tensor:
        return self.out_conv(px_z).permute(0, 2, 3, 1)  # NHWC, as the official head returns it


class Decoder(nn.Module):
    """Learned start states (``bias_xs``, resolutions <= no_bias_above), the blocks, gain/bias at the top."""

    def __init__(self, hp: VDVAEHparams) -> None:
        super().__init__()
        self.hp = hp
        self.gain = nn.Parameter(torch.ones(1, hp.width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, hp.width, 1, 1))
        self.dec_blocks = nn.ModuleList(DecBlock(hp, r, m) for r, m in hp.dec_layers())
        self.bias_res = [r for r in hp.dec_resolutions() if r <= hp.no_bias_above]
        self.bias_xs = nn.ParameterList(nn.Parameter(torch.zeros(1, hp.width_at(r), r, r)) for r in self.bias_res)
        self.out_net = DmolHead(hp.width, hp.num_mixtures)

    def forward(self, acts: dict[int, torch.Tensor], eps: list[torch.Tensor] | None
                ) -> tuple[dict[int, torch.Tensor], list[dict[str, torch.Tensor]]]:
        xs = dict(zip(self.bias_res, self.bias_xs))
        stats = [block(xs, acts, None if eps is None else eps[i]) for i, block in enumerate(self.dec_blocks)]
        top = self.hp.image_size
        xs[top] = xs[top] * self.gain + self.bias
        return xs, stats


class VDVAE(nn.Module):
    """Encoder + decoder, keys as in the official ``VAE`` (``encoder.*``, ``decoder.*``).

    Example:
        >>> from backbones.vdvae import FFHQ256_HPARAMS
        >>> with torch.device("meta"):
        ...     net = VDVAE(VDVAEHparams.from_dict(FFHQ256_HPARAMS))
        >>> len(net.state_dict()), sum(p.numel() for p in net.parameters())
        (2272, 114874852)
    """

    def __init__(self, hp: VDVAEHparams) -> None:
        super().__init__()
        self.hp = hp
        self.encoder = Encoder(hp)
        self.decoder = Decoder(hp)
        if not self.decoder.gain.is_meta:
            self.official_init()

    def official_init(self) -> None:
        """Random init in the official spirit: zero biases, zero prior output convs, and the last conv
        of every residual branch (and z_proj) scaled by sqrt(1 / blocks) to keep the sum stable."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.bias.zero_()
            for block in self.encoder.enc_blocks:
                block.c4.weight.mul_(math.sqrt(1 / len(self.encoder.enc_blocks)))
            for block in self.decoder.dec_blocks:
                block.prior.c4.weight.zero_()
                block.z_proj.weight.mul_(math.sqrt(1 / len(self.decoder.dec_blocks)))
                block.resnet.c4.weight.mul_(math.sqrt(1 / len(self.decoder.dec_blocks)))

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """Per decoder block, the shape of one image's latent ``(zdim, res, res)``."""
        return [(self.hp.zdim, b.res, b.res) for b in self.decoder.dec_blocks]

    def forward(self, x_nhwc: torch.Tensor, eps: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """NHWC normalised images -> ``{"enc": res -> map, "xs": res -> state, "stats": per block}``.

        ``eps`` holds one ``[B, zdim, res, res]`` standard-normal tensor per decoder block
        (z = exp(qv) * eps + qm); None uses the posterior means.
        """
        acts = self.encoder(x_nhwc.permute(0, 3, 1, 2).contiguous())
        xs, stats = self.decoder(acts, eps)
        return {"enc": acts, "xs": xs, "stats": stats}
