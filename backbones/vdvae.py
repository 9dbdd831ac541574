"""``vdvae``: pixel features from a Very Deep VAE (Child, ICLR 2021), the paper's VDVAE row (spec 2.3).

An image goes through the encoder (a ResNet that pools from the image size down to 1 x 1), then the
top-down decoder, whose blocks each draw a latent z = exp(qv) * eps + qm from the posterior. Features
(decision D12) are the encoder's LAST activation at each resolution (descending: 256, 128, ..., 4, 1),
then the decoder state at each resolution after the pass (ascending: 1, 4, ..., 256; the 256 state
includes the final gain/bias): 16 maps of 512 channels, 8192 per pixel for the FFHQ-256 model.

The input is NHWC, normalised with the ``ffhq_256`` constants: 0 -> -1.6159, 255 -> 2.0349.

Noise (D12): eps is drawn per image from a CPU generator seeded by the run ``seed`` and the sha256 of
that image's model input, so an image's features do not depend on the device, the batch it is in or
its position there. ``posterior="mean"`` uses z = qm instead (no noise, no seed).

Weights: the only official checkpoint is FFHQ-256 (``ffhq256``, used for FFHQ-34 and CelebA-19). No
VDVAE exists for LSUN bedroom/cat/horse or ADE20K bedrooms: for those, pass your own ``checkpoint``
(``--weights``) with its ``arch``. VDVAE files are bare state dicts without hyper-parameters: what
the shapes determine (width, zdim, widths per resolution, bottleneck, mixtures, no_bias_above) is
read from the file; the block strings ``enc_blocks``/``dec_blocks`` come from ``arch`` (official
names), else from the FFHQ-256 configuration. Both flavours load: ``*-model-ema.th`` and the DDP
``*-model.th`` whose keys carry ``module.``.

Example:
    >>> import bench
    >>> bench.create_backbone("vdvae", pretrained=False, device="meta").num_features
    8192
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from bench import Backbone, BenchError, FeatureInfo, Weights, register_backbone
from bench.errors import CheckpointError
from bench.seeding import is_int

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from backbones._vdvae_net import VDVAEHparams

_URL = "https://openaipublic.blob.core.windows.net/very-deep-vaes-assets/vdvae-assets/"

#: The official FFHQ-256 hyper-parameters (spec 2.3); image size and channels come from the data.
FFHQ256_HPARAMS: Mapping[str, Any] = {
    "width": 512, "zdim": 16, "bottleneck_multiple": 0.25, "custom_width_str": "", "no_bias_above": 64,
    "num_mixtures": 10, "image_size": 256, "image_channels": 3, "dataset": "ffhq_256",
    "enc_blocks": "256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4",
    "dec_blocks": "1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128",
}
#: A tiny random-init variant with the same structure, for the contract test (milliseconds per image).
TINY_HPARAMS: Mapping[str, Any] = {
    "width": 16, "zdim": 4, "bottleneck_multiple": 0.25, "custom_width_str": "", "no_bias_above": 64,
    "num_mixtures": 2, "image_size": 32, "image_channels": 3, "dataset": "ffhq_256",
    "enc_blocks": "32x1,32d4,8x1,8d4,2x1,2d2,1x1", "dec_blocks": "1x1,2m1,8m2,8x1,32m8",
}
POSTERIORS = ("sample", "mean")


def noise_seed(seed: int, image: "torch.Tensor") -> int:
    """The 63-bit generator seed of one image's eps: sha256 of the run seed and the image's model input.

    Example:
        >>> import torch
        >>> x = torch.zeros(4, 4, 3)
        >>> noise_seed(0, x) == noise_seed(0, x.clone()) != noise_seed(1, x)
        True
    """
    import torch

    data = image.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()
    return int.from_bytes(hashlib.sha256(f"bench/vdvae-eps/{seed}/{digest}".encode()).digest()[:8], "big") >> 1


def resolve_hparams(arch: Mapping[str, Any] | None, state: Mapping[str, "torch.Tensor"] | None,
                    fallback: Mapping[str, Any]) -> "VDVAEHparams":
    """The architecture: ``arch`` entries first, then what the checkpoint's shapes determine, then
    ``fallback`` (the tag's configuration). ``image_size`` defaults to the encoder's first resolution.

    Example:
        >>> resolve_hparams({"width": 8, "zdim": 2}, None, TINY_HPARAMS).to_dict()["width"]
        8
    """
    from backbones._vdvae_files import infer_hparams
    from backbones._vdvae_net import VDVAEHparams, parse_blocks

    if arch is not None and not isinstance(arch, Mapping):
        raise BenchError(f"vdvae arch must be a mapping of official hyper-parameter names, got {arch!r}")
    explicit = dict(arch or {})
    values = {**fallback, **{k: v for k, v in explicit.items() if k in ("enc_blocks", "dec_blocks")}}
    if state is not None:
        enc = parse_blocks(values["enc_blocks"], what="enc_blocks", extra="d")
        dec = parse_blocks(values["dec_blocks"], what="dec_blocks", extra="m")
        values.update(infer_hparams(state, enc, dec))
    values.update(explicit)
    if "image_size" not in explicit:
        values["image_size"] = parse_blocks(values["enc_blocks"], what="enc_blocks", extra="d")[0][0]
    return VDVAEHparams.from_dict(values)


@register_backbone("vdvae")
class VDVAEBackbone(Backbone):
    """Per-resolution encoder activations and decoder states of a VDVAE.

    ``seed`` (the run seed) fixes the posterior noise; ``posterior`` is ``"sample"`` (default) or
    ``"mean"``; ``checkpoint`` (``.th``/``.pt``/``.safetensors`` state dict) replaces the tag's weights;
    ``arch`` gives hyper-parameters under their official names (see the module docstring).

    Example:
        >>> import bench
        >>> bb = bench.create_backbone("vdvae", pretrained=False, device="meta")
        >>> [f.name for f in bb.feature_info][6:10], bb.feature_info[0]
        (['enc4', 'enc1', 'dec1', 'dec4'], FeatureInfo(name='enc256', channels=512, stride=1))
    """

    weights = {
        "ffhq256": Weights(
            tag="ffhq256", url=(f"{_URL}ffhq256-iter-1700000-model-ema.th",), domain="ffhq",
            license="MIT (openai/vdvae)", arch=dict(FFHQ256_HPARAMS),
            paper_miou={"ffhq_34": (57.3, 1.1), "celeba_19": (54.1, 1.0)},
            description="official VDVAE trained on FFHQ-256 (EMA weights, iteration 1.7M); the only official "
                        "VDVAE of the paper's domains: none exists for LSUN or ADE20K, pass --weights there",
        ),
    }
    default_tag = "ffhq256"
    tiny = {"pretrained": False, "arch": dict(TINY_HPARAMS)}

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu", seed: int = 0,
                 posterior: str = "sample", checkpoint: str | Path | None = None,
                 arch: Mapping[str, Any] | None = None) -> None:
        super().__init__(tag=tag, pretrained=pretrained, device=device)
        import torch

        from backbones._vdvae_files import read_state_dict
        from backbones._vdvae_net import VDVAE

        if posterior not in POSTERIORS:
            raise BenchError(f"vdvae posterior must be one of {list(POSTERIORS)}, got {posterior!r}")
        if not is_int(seed):
            raise BenchError(f"vdvae seed must be an integer, got {seed!r}")
        self.posterior, self.seed = posterior, seed
        path, state = None, None
        if checkpoint is not None:
            path = Path(checkpoint)
            if tag is None:
                self.tag = None  # a user's own weights: no paper numbers attached to them
            # Read even for a random-init control: the file's shapes are its only record of the architecture.
            state = read_state_dict(path)
        self.hparams = resolve_hparams(arch, state, self.weights[self.tag or self.default_tag].arch)
        with torch.device("meta"):  # allocates nothing; a strict load materialises the checkpoint
            model = VDVAE(self.hparams)
        if pretrained:
            if path is None:
                from bench.hub import fetch_weights

                path = fetch_weights(self.weights_entry, module_file=__file__, name=f"vdvae.{self.tag}")
                state = read_state_dict(path)
            self._load(model, state, path, user_file=checkpoint is not None)
        elif str(device) != "meta":
            model = VDVAE(self.hparams)  # random init (global RNG, seeded by the runner for controls)
        self.model = model.to(device).eval().requires_grad_(False)

    def _load(self, model: "torch.nn.Module", state: Mapping[str, "torch.Tensor"], path: Path,
              user_file: bool) -> None:
        from bench.checkpoints import load_strict
        from bench.hub import sha256_file

        try:
            load_strict(model, state, source=str(path))
        except CheckpointError as err:
            if not user_file:
                raise
            # The block strings are the one thing a VDVAE file cannot tell us.
            raise CheckpointError(f"{err}; VDVAE files store no hyper-parameters: pass arch= with the "
                                  f"checkpoint's enc_blocks and dec_blocks (used: {self.hparams.enc_blocks!r}, "
                                  f"{self.hparams.dec_blocks!r})") from err
        self._weights_sha256 = sha256_file(path)

    @property
    def input_size(self) -> int:
        """The model's square image size (its decoder start states have fixed sizes): 256 for FFHQ-256."""
        return self.hparams.image_size

    def _resolutions(self) -> tuple[list[int], list[int]]:
        return self.hparams.enc_resolutions(), self.hparams.dec_resolutions()

    @property
    def feature_info(self) -> list[FeatureInfo]:
        enc, dec = self._resolutions()
        size, hp = self.hparams.image_size, self.hparams
        return ([FeatureInfo(f"enc{r}", hp.width_at(r), size // r) for r in enc]
                + [FeatureInfo(f"dec{r}", hp.width_at(r), size // r) for r in dec])

    def preprocess(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 ``[B, 3, H, W]`` -> float32 NHWC ``(v + shift) * scale`` (``ffhq_256``), resized to ``input_size``.

        The official model takes NHWC and permutes it itself. Another size is resized bilinearly
        (antialiased when shrinking) before normalising; at the model's size nothing is resampled.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("vdvae", **VDVAEBackbone.tiny)
            >>> images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
            >>> images[..., 16:] = 255  # right half white
            >>> x = bb.preprocess(images)
            >>> tuple(x.shape), [round(v, 4) for v in x[0, 0, [0, -1], 0].tolist()]  # NHWC: row 0, columns 0, 31
            ((1, 32, 32, 3), [-1.6159, 2.0349])
        """
        import torch
        import torch.nn.functional as F

        from backbones._vdvae_net import PREPROCESSING

        channels, size = self.hparams.image_channels, self.hparams.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != channels:
            shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise BenchError(f"vdvae expects images of shape [B, {channels}, H, W], got {shape}")
        if images.dtype != torch.uint8:
            raise BenchError(f"vdvae preprocess expects uint8 images, got {images.dtype}")
        x = images.to(device=self.device, dtype=torch.float32)
        if tuple(x.shape[-2:]) != (size, size):
            shrink = x.shape[-2] > size or x.shape[-1] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        shift, scale = PREPROCESSING[self.hparams.dataset]
        return (x.permute(0, 2, 3, 1).contiguous() + shift) * scale

    def latent_noise(self, x: "torch.Tensor") -> "list[torch.Tensor] | None":
        """The eps of every decoder block (``[B, zdim, r, r]`` each) for NHWC inputs ``x``; None for
        ``posterior="mean"``. Image b's come, block after block, from one CPU generator seeded with
        :func:`noise_seed` (``seed``, image b), then move to the device.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("vdvae", **VDVAEBackbone.tiny)
            >>> [tuple(e.shape) for e in bb.latent_noise(torch.zeros(2, 32, 32, 3))][:2]
            [(2, 4, 1, 1), (2, 4, 2, 2)]
        """
        import torch

        if self.posterior == "mean":
            return None
        shapes = self.model.latent_shapes()
        if x.is_meta:
            return [torch.empty((x.shape[0], *s), device="meta") for s in shapes]
        draws = []
        for image in x:
            generator = torch.Generator("cpu").manual_seed(noise_seed(self.seed, image))
            draws.append([torch.randn(s, generator=generator) for s in shapes])
        return [torch.stack([d[i] for d in draws]).to(self.device) for i in range(len(shapes))]

    def forward_features(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """NHWC ``[B, S, S, 3]`` (from :meth:`preprocess`) -> encoder maps (descending resolution), then
        decoder states (ascending), each ``[B, C, r, r]``.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("vdvae", **VDVAEBackbone.tiny)
            >>> [tuple(m.shape[1:]) for m in bb.forward_features(torch.zeros(1, 32, 32, 3))][3:5]
            [(16, 1, 1), (16, 1, 1)]
        """
        import torch

        size, channels = self.hparams.image_size, self.hparams.image_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (size, size, channels):
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise BenchError(f"vdvae expects NHWC inputs [B, {size}, {size}, {channels}] (from preprocess), "
                             f"got {shape}")
        x = x.to(device=self.device, dtype=torch.float32)
        with torch.no_grad():
            out = self.model(x, self.latent_noise(x))
        enc, dec = self._resolutions()
        return [out["enc"][r] for r in enc] + [out["xs"][r] for r in dec]

    def config(self) -> dict[str, Any]:
        """Base config plus the hyper-parameters, the posterior mode and the noise seed (None for the mean).

        Example:
            >>> import bench
            >>> cfg = bench.create_backbone("vdvae", **VDVAEBackbone.tiny, posterior="mean", seed=3).config()
            >>> cfg["posterior"], cfg["seed"], cfg["arch"]["zdim"]
            ('mean', None, 4)
        """
        cfg = super().config()
        cfg.update({"arch": self.hparams.to_dict(), "posterior": self.posterior,
                    "seed": self.seed if self.posterior == "sample" else None})
        return cfg
