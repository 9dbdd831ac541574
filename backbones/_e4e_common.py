"""Shared part of the ``gan_encoder`` and ``gan_inversion`` plugins: e4e weights, architecture, loading.

Both plugins run the official e4e checkpoints (encoder4editing, Google Drive only): the FFHQ model
(rosinality generator at 1024, 18 W+ rows) and the LSUN-Horse model (config-f at 256, 14 rows). No
e4e exists for LSUN-Cat or LSUN-Bedroom: the paper's Cat-15 / Bedroom-28 / ADE-Bedroom-30 GAN rows
used unreleased models, so those tags are refused with a message that asks for ``--weights``.

Importing this module does not import torch (plugin modules stay cheap to import).

Example:
    >>> parse_arch({"size": 1024}, owner="gan_inversion")["size"]
    1024
"""
from __future__ import annotations

import contextlib
import operator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from bench import Backbone, BenchError, Weights
from bench.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_DRIVE = "https://drive.google.com/uc?id="
#: e4e's README model links (spec 2.2); no sha256 is published, it is recorded beside the first download
DRIVE_IDS = {"ffhq": "1cUv_reLE6k3604or78EranS7XzuVMWeO", "lsun_horse": "1TkLLnuX86B_BMo2ocYD0kX9kWh53rUVX"}
LICENSE = ("MIT (omertov/encoder4editing); the decoder weights derive from NVIDIA StyleGAN2 "
           "(NVIDIA Source Code License, non-commercial)")
#: domains with a Table 2 GAN row but no released e4e model, and the datasets concerned
NO_OFFICIAL = {"lsun_cat": "Cat-15", "lsun_bedroom": "Bedroom-28 and ADE-Bedroom-30"}

#: e4e = Encoder4Editing(50, 'ir_se') + rosinality Generator(size, 512, 8, channel_multiplier=2)
E4E_ARCH: Mapping[str, Any] = {
    "size": 256, "encoder_type": "Encoder4Editing", "start_from_latent_avg": True, "encoder_size": 256,
    "style_dim": 512, "n_mlp": 8, "channel_multiplier": 2, "channel_max": 512,
    "stage_units": [3, 4, 14, 3], "stage_channels": [64, 128, 256, 512],
}
#: random-init test variant: the same structure, one IR-SE unit per stage, 16-32 channels, 32 px
TINY_ARCH: Mapping[str, Any] = {
    "size": 32, "encoder_size": 32, "style_dim": 16, "n_mlp": 2, "channel_max": 16,
    "stage_units": [1, 1, 1, 1], "stage_channels": [16, 16, 32, 32],
}
#: what the stored opts say, when they say it (rosinality size, encoder class, latent_avg rule)
FILE_KEYS = ("size", "encoder_type", "start_from_latent_avg")


def _int(value: Any, key: str, owner: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise BenchError(f"{owner} arch {key} must be an integer, got {value!r}") from None


def parse_arch(arch: Mapping[str, Any], *, owner: str) -> dict[str, Any]:
    """Official defaults overridden by ``arch``, validated; errors name the key and value.

    Example:
        >>> parse_arch({"size": 100}, owner="gan_inversion")
        Traceback (most recent call last):
        bench.errors.BenchError: gan_inversion arch size must be a power of two >= 8, got 100
    """
    from backbones._e4e_encoder import ENCODER_TYPES, SE_REDUCTION

    if not isinstance(arch, Mapping):
        raise BenchError(f"{owner} arch must be a dict, got {type(arch).__name__}")
    unknown = sorted(set(arch) - set(E4E_ARCH))
    if unknown:
        raise BenchError(f"{owner} arch has unknown key(s) {unknown}; known: {sorted(E4E_ARCH)}")
    out = {**E4E_ARCH, **arch}
    for key in ("size", "encoder_size", "style_dim", "n_mlp", "channel_multiplier", "channel_max"):
        out[key] = _int(out[key], key, owner)
    if out["size"] < 8 or out["size"] & (out["size"] - 1):
        raise BenchError(f"{owner} arch size must be a power of two >= 8, got {out['size']}")
    if not 16 <= out["encoder_size"] <= 256 or out["encoder_size"] % 16:
        # The style heads end at 1 x 1 only up to 256 px (4 stride-2 convs on the 1/16 map).
        raise BenchError(f"{owner} arch encoder_size must be a multiple of 16 in 16..256, got {out['encoder_size']}")
    if min(out["style_dim"], out["n_mlp"], out["channel_multiplier"], out["channel_max"]) < 1:
        raise BenchError(f"{owner} arch style_dim, n_mlp, channel_multiplier and channel_max must be positive")
    if out["encoder_type"] not in ENCODER_TYPES:
        raise BenchError(f"{owner} arch encoder_type {out['encoder_type']!r} is not supported; "
                         f"known: {', '.join(ENCODER_TYPES)}")
    if not isinstance(out["start_from_latent_avg"], bool):
        raise BenchError(f"{owner} arch start_from_latent_avg must be true or false, got {out['start_from_latent_avg']!r}")
    for key in ("stage_units", "stage_channels"):
        values = out[key]
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != 4:
            raise BenchError(f"{owner} arch {key} must list 4 stages, got {values!r}")
        out[key] = [_int(v, key, owner) for v in values]
    if min(out["stage_units"]) < 1 or min(out["stage_channels"]) < SE_REDUCTION:
        raise BenchError(f"{owner} arch needs >= 1 unit and >= {SE_REDUCTION} channels per stage "
                         f"(squeeze-excitation reduction), got {out['stage_units']} / {out['stage_channels']}")
    return out


def n_styles(size: int) -> int:
    """W+ rows of a rosinality generator: 2 log2(size) - 2 (14 at 256, 18 at 1024).

    Example:
        >>> n_styles(256), n_styles(1024)
        (14, 18)
    """
    return 2 * (size.bit_length() - 1) - 2


def e4e_weights(name: str, paper: Mapping[str, Mapping[str, tuple[float, float]]]) -> dict[str, Weights]:
    """The official e4e files as a weights table; ``paper`` maps tag -> the Table 2 values of ``name``.

    Example:
        >>> e4e_weights("GAN Encoder", {"lsun_horse": {"horse_21": (26.7, 0.7)}})["lsun_horse"].arch["size"]
        256
    """
    sizes = {"ffhq": (1024, "FFHQ (rosinality StyleGAN2 at 1024, 18 W+ rows)"),
             "lsun_horse": (256, "LSUN-Horse (StyleGAN2 config-f at 256, 14 W+ rows)")}
    table = {}
    for tag, (size, what) in sizes.items():
        table[tag] = Weights(
            tag=tag, url=(_DRIVE + DRIVE_IDS[tag],), domain=tag, license=LICENSE,
            arch={**E4E_ARCH, "size": size}, paper_miou=dict(paper.get(tag, {})),
            description=(f"official e4e encoder and decoder for {what}; {name} features. No official e4e "
                         f"exists for LSUN-Cat or LSUN-Bedroom: pass --weights for those datasets"),
        )
    return table


class E4EBackbone(Backbone):
    """Base of the two e4e plugins: tag checks, architecture resolution, safe strict loading, input.

    Subclasses call :meth:`_setup` after validating their own settings; it sets ``arch``,
    ``encoder``, ``decoder`` (None unless asked for), ``latent_avg`` and the weights sha256.
    """

    default_tag = "lsun_horse"
    #: dataset domains with a paper row but no released e4e; the runner does not read this yet (it falls
    #: back to ``default_tag`` when no tag's domain matches), the tag check in ``__init__`` does
    unavailable_domains: ClassVar[Mapping[str, str]] = NO_OFFICIAL

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu") -> None:
        if tag in NO_OFFICIAL:
            raise BenchError(f"{self.name}: no official e4e checkpoint for {tag} (the paper's "
                             f"{NO_OFFICIAL[tag]} model was never released); pass --weights <e4e .pt file> "
                             f"(checkpoint=...) with your own e4e model")
        super().__init__(tag=tag, pretrained=pretrained, device=device)

    def _setup(self, *, checkpoint: str | Path | None, arch: Mapping[str, Any] | None, tag_given: bool,
               need_decoder: bool) -> None:
        import torch

        from backbones._e4e_checkpoint import (check_container, checked_latent_avg, read_container,
                                               split_halves)
        from bench.checkpoints import load_strict
        from bench.hub import fetch_weights, sha256_file

        base = dict(self.weights_entry.arch) if self.weights_entry is not None else dict(E4E_ARCH)
        if arch is not None:
            parse_arch(arch, owner=self.name)  # unknown keys and bad values fail before any download
        container, path = None, None
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise CheckpointError(f"{self.name} checkpoint file not found: {path}")
            if not tag_given:
                self.tag = None  # a user's own weights: no paper numbers attached to them
                base = dict(E4E_ARCH)
            # A random-init control reads the file for its architecture only, never its tensors.
            container = read_container(path)
        elif self.pretrained:
            # One cache folder for both plugins: they read the same e4e file.
            path = fetch_weights(self.weights_entry, module_file=__file__, name=f"e4e.{self.tag}")
            container = read_container(path)
        stored, inferred = _stored_arch(container)
        for key, value in stored.items():
            if arch is not None and key in arch and arch[key] != value:
                raise BenchError(f"{self.name} arch {key}={arch[key]!r} contradicts checkpoint {path}, "
                                 f"which stores {value!r}")
        self.arch = parse_arch({**base, **inferred, **(arch or {}), **stored}, owner=self.name)
        self.n_styles = n_styles(self.arch["size"])
        # Loaded weights replace meta tensors (no wasted random init); a meta device allocates nothing.
        meta = (container is not None and self.pretrained) or str(self.device) == "meta"
        with torch.device("meta") if meta else contextlib.nullcontext():
            encoder, decoder = self._build()
        latent_avg = torch.zeros(self.n_styles, self.arch["style_dim"])
        if container is not None and self.pretrained:
            source = str(path)
            check_container(encoder, decoder, container.state_dict, source)
            enc_state, dec_state = split_halves(container.state_dict, source)
            load_strict(encoder, enc_state, source=f"{source} (encoder.*)")
            if need_decoder:
                load_strict(decoder, dec_state, source=f"{source} (decoder.*)")
            if self.arch["start_from_latent_avg"]:
                latent_avg = checked_latent_avg(container.latent_avg, self.n_styles, self.arch["style_dim"], source)
            self._weights_sha256 = sha256_file(path)
        elif meta:
            latent_avg = latent_avg.to("meta")
        # Random init: latent_avg stays 0 (a random generator has no meaningful mean latent).
        self.encoder = encoder.to(self.device).eval().requires_grad_(False)
        self.decoder = decoder.to(self.device).eval().requires_grad_(False) if need_decoder else None
        self.latent_avg = latent_avg.to(self.device)

    def _build(self) -> tuple["torch.nn.Module", "torch.nn.Module"]:
        from backbones._e4e_decoder import RosinalityGenerator
        from backbones._e4e_encoder import E4EEncoder

        a = self.arch
        encoder = E4EEncoder(n_styles=self.n_styles, stage_units=a["stage_units"], stage_channels=a["stage_channels"],
                             style_dim=a["style_dim"], encoder_type=a["encoder_type"])
        decoder = RosinalityGenerator(size=a["size"], style_dim=a["style_dim"], n_mlp=a["n_mlp"],
                                      channel_multiplier=a["channel_multiplier"], channel_max=a["channel_max"])
        return encoder, decoder

    @property
    def encoder_size(self) -> int:
        """The square size the encoder sees (256 for e4e, also with the 1024 generator)."""
        return self.arch["encoder_size"]

    def preprocess(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 [B, 3, H, W] -> [-1, 1] float32 at ``encoder_size`` (bilinear, antialiased when
        shrinking, like the official PIL resize to 256): 0 -> -1, 255 -> +1.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("gan_encoder", pretrained=False, arch=TINY_ARCH)
            >>> images = torch.stack([torch.zeros(3, 64, 64), torch.full((3, 64, 64), 255.0)]).to(torch.uint8)
            >>> x = bb.preprocess(images)  # resized from 64 x 64 to the tiny encoder's 32 x 32
            >>> tuple(x.shape), x[0].unique().tolist(), x[1].unique().tolist()
            ((2, 3, 32, 32), [-1.0], [1.0])
        """
        import torch
        import torch.nn.functional as F

        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise BenchError(f"{self.name} expects images of shape [B, 3, H, W], got {shape}")
        if images.dtype != torch.uint8:
            raise BenchError(f"{self.name} preprocess expects uint8 images, got {images.dtype}")
        device = "cpu" if str(self.device) == "meta" else self.device
        x = images.to(device=device, dtype=torch.float32) / 255.0
        size = (self.encoder_size, self.encoder_size)
        if tuple(x.shape[-2:]) != size:
            shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        return ((x - 0.5) / 0.5).to(self.device)  # torchvision Normalize([0.5] * 3, [0.5] * 3)

    def _encoder_input(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        size = self.encoder_size
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size):
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise BenchError(f"{self.name} expects inputs of shape [B, 3, {size}, {size}] in [-1, 1], got {shape}")
        return x.to(device=self.device, dtype=torch.float32)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["arch"] = dict(self.arch)
        return cfg


def _stored_arch(container: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the file's opts fix, what its tensors imply when the opts are silent).

    Without ``stylegan_size`` the size follows from the 2 log2(size) - 3 noise buffers; without
    ``start_from_latent_avg`` the mean latent is added when the file stores one. An explicit ``arch``
    overrides the implied values but may not contradict the opts.
    """
    if container is None:
        return {}, {}
    from backbones._e4e_checkpoint import arch_from_opts

    stored = arch_from_opts(container.opts, container.path)
    inferred: dict[str, Any] = {}
    count = sum(1 for k in container.state_dict if k.startswith("decoder.noises.noise_"))
    if "size" not in stored and count:
        inferred["size"] = 2 ** ((count + 3) // 2)
    if "start_from_latent_avg" not in stored:
        inferred["start_from_latent_avg"] = container.latent_avg is not None
    return stored, inferred
