"""``alae``: pixel features from an ALAE autoencoder (Pidhorskyi et al., CVPR 2020), the Table 2 "ALAE" row.

An image in [-1, 1] at the model's resolution is encoded to w (Z, ``[B, 1, 512]``), w is repeated for
every style input of the decoder and decoded with noise, as in the official demo (no truncation).
The features are the outputs of the decoder blocks ``decode_block[i]`` at their native resolution
(spec D13): 2016 per pixel for the bedroom model (4..256 px), 2544 for FFHQ (4..1024 px). The encoder
block outputs are the recorded variant (``source="encoder"``: 2496 / 3040).

Noise: one ``[1, 1, H, W]`` map per decoder stage, drawn once from a CPU generator seeded with ``seed``
and shared by every image, so an image's features do not depend on its batch (the official demo draws
fresh noise per call; with batch 1 after ``torch.manual_seed(seed)`` it draws exactly these values).

Official checkpoints exist for LSUN bedroom (256 px) and FFHQ (1024 px; FFHQ-34 and CelebA-19 images are
upsampled to 1024). There is **no official ALAE checkpoint for LSUN cat or horse** (the paper's Cat-15 and
Horse-21 cells are empty): use your own file with ``checkpoint=`` (``--weights``).

Example:
    >>> import bench
    >>> [bench.create_backbone(f"alae.{t}", pretrained=False, device="meta").num_features
    ...  for t in ("lsun_bedroom", "ffhq")]
    [2016, 2544]
"""
from __future__ import annotations

import operator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from bench import Backbone, BenchError, FeatureInfo, Weights, register_backbone
from bench.contract import validate_indices
from bench.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_S3 = "https://alaeweights.s3.us-east-2.amazonaws.com/"
_LICENSE = "Apache-2.0 (ALAE README badge; the repository has no LICENSE file)"

#: official ``configs/bedroom.yaml`` and ``configs/ffhq.yaml`` (constructor argument names of ``Model``)
BEDROOM_ARCH: Mapping[str, Any] = {"layer_count": 7, "startf": 32, "maxf": 512, "latent_size": 512,
                                   "mapping_layers": 8, "channels": 3}
FFHQ_ARCH: Mapping[str, Any] = {"layer_count": 9, "startf": 16, "maxf": 512, "latent_size": 512,
                                "mapping_layers": 8, "channels": 3}
#: random-init test variant: 16 px, 3 blocks, tiny widths
TINY_ARCH: Mapping[str, Any] = {"layer_count": 3, "startf": 4, "maxf": 16, "latent_size": 8, "mapping_layers": 2}

_DEFAULTS = {"maxf": 512, "latent_size": 512, "mapping_layers": 8, "mapping_tl_layers": 3, "channels": 3}
#: names of the official yaml config (``cfg.MODEL``) accepted as aliases
_YAML_NAMES = {"LAYER_COUNT": "layer_count", "START_CHANNEL_COUNT": "startf", "MAX_CHANNEL_COUNT": "maxf",
               "LATENT_SPACE_SIZE": "latent_size", "MAPPING_LAYERS": "mapping_layers", "CHANNELS": "channels"}
#: Model arguments that do not change the encode/decode features (truncation is only used for sampling)
_IGNORED = {"truncation_psi", "truncation_cutoff", "dlatent_avg_beta", "style_mixing_prob", "z_regression", "config"}
_ONLY = {"generator": "GeneratorDefault", "encoder": "EncoderDefault"}
SOURCES = ("decoder", "encoder")


def parse_arch(arch: Mapping[str, Any]) -> dict[str, int]:
    """User/table architecture -> the full set of integer fields of :class:`ALAEArch`.

    ``layer_count`` and ``startf`` are required; the other fields default to the official values.

    Example:
        >>> parse_arch({"LAYER_COUNT": 9, "START_CHANNEL_COUNT": 16})["maxf"]
        512
        >>> parse_arch({"layer_count": 7})
        Traceback (most recent call last):
        bench.errors.BenchError: alae arch needs 'startf' (and 'layer_count'); got ['layer_count']
    """
    if not isinstance(arch, Mapping):
        raise BenchError(f"alae arch must be a mapping of constructor arguments, got {type(arch).__name__}")
    out: dict[str, Any] = {}
    for key, value in arch.items():
        name = _YAML_NAMES.get(key, key)
        if name in _IGNORED:
            continue
        if name in _ONLY:
            if value != _ONLY[name]:
                raise BenchError(f"alae arch {key}={value!r} is not supported; only {_ONLY[name]!r} is implemented")
            continue
        if name not in {"layer_count", "startf", *_DEFAULTS}:
            known = sorted({"layer_count", "startf", *_DEFAULTS, *_YAML_NAMES})
            raise BenchError(f"alae arch has unknown key {key!r}; known: {known}")
        try:
            number = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            number = None
        if number is None or number < 1:
            raise BenchError(f"alae arch {key} must be a positive integer, got {value!r}")
        out[name] = number
    missing = [k for k in ("layer_count", "startf") if k not in out]
    if missing:
        raise BenchError(f"alae arch needs {missing[0]!r} (and 'layer_count'); got {sorted(arch)}")
    return {**_DEFAULTS, **out}


def _alae(tag: str, path: str, arch: Mapping[str, Any], paper: Mapping[str, tuple[float, float]], what: str) -> Weights:
    return Weights(tag=tag, url=(f"{_S3}{path}",), domain=tag, license=_LICENSE, arch=dict(arch), paper_miou=paper,
                   description=f"official ALAE {what} (EMA groups)")


@register_backbone("alae")
class ALAE(Backbone):
    """Decoder (or encoder) block outputs of an ALAE autoencoder for the image's own latent.

    ``blocks``: block indices (default: all, ascending); ``source``: ``"decoder"`` (default) or
    ``"encoder"``; ``seed``: the noise seed; ``checkpoint``: an official ``model_*.pth`` or a flat
    ``group.param`` state dict (``.pt``/``.safetensors``) replacing the tag's weights, its architecture
    read from its shapes unless ``arch`` (constructor names, or the yaml's ``LAYER_COUNT``...) is given.

    Example:
        >>> import bench
        >>> bb = bench.create_backbone("alae.ffhq", pretrained=False, device="meta")
        >>> bb.input_size, bb.feature_info[-1]
        (1024, FeatureInfo(name='decode_block8', channels=16, stride=1))
    """

    weights = {
        "lsun_bedroom": _alae("lsun_bedroom", "bedroom/model_final.pth", BEDROOM_ARCH,
                              {"bedroom_28": (20.0, 1.0), "ade_bedroom_30": (15.0, 0.5)}, "LSUN bedroom 256 px"),
        "ffhq": _alae("ffhq", "ffhq/model_157.pth", FFHQ_ARCH, {"ffhq_34": (48.1, 1.3), "celeba_19": (49.7, 0.7)},
                      "FFHQ 1024 px (model_157, the file the official demos use)"),
    }
    default_tag = "lsun_bedroom"
    tiny = {"pretrained": False, "arch": dict(TINY_ARCH)}

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu",
                 blocks: Sequence[int] | None = None, source: str = "decoder", seed: int = 0,
                 checkpoint: str | Path | None = None, arch: Mapping[str, Any] | None = None) -> None:
        super().__init__(tag=tag, pretrained=pretrained, device=device)
        import torch

        from backbones._alae_files import infer_arch, read_alae_state_dict
        from backbones._alae_net import ALAE as Net
        from backbones._alae_net import ALAEArch, constant_noise

        if source not in SOURCES:
            raise BenchError(f"alae source must be one of {list(SOURCES)}, got {source!r}")
        self.source = source
        state, path = None, None
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise CheckpointError(f"alae checkpoint file not found: {path}")
            if tag is None:
                self.tag = None  # a user's own weights: no paper numbers attached to them
        if arch is not None:
            self.arch = ALAEArch(**parse_arch(arch))
        elif path is not None:
            # ALAE files store no config; their shapes determine it. A control reads only that.
            state = read_alae_state_dict(path)
            self.arch = infer_arch(state, str(path))
        else:
            self.arch = ALAEArch(**parse_arch(self.weights[self.tag or self.default_tag].arch))
        count = self.arch.layer_count
        self.blocks = tuple(sorted(validate_indices(list(range(count)) if blocks is None else blocks,
                                                    limit=count, owner="alae")))
        self.seed = seed
        self.noise = [n.to(device) for n in constant_noise(self.arch, seed)]

        if pretrained:
            if path is None:  # fetched only now, so that a wrong block costs no download
                from bench.hub import fetch_weights

                path = fetch_weights(self.weights_entry, module_file=__file__, name=f"alae.{self.tag}")
            if state is None:
                state = read_alae_state_dict(path)
            from bench.checkpoints import load_strict
            from bench.hub import sha256_file

            with torch.device("meta"):  # allocates nothing; load_strict materialises the checkpoint
                net = Net(self.arch)
            load_strict(net, state, source=str(path))
            self._weights_sha256 = sha256_file(path)
        elif str(device) == "meta":
            with torch.device("meta"):
                net = Net(self.arch)
        else:
            # A random-init control: the file (if any) gave its architecture, never its tensors. Seeded
            # like the ddpm control; fork_rng leaves the caller's global RNG untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = Net(self.arch)
        self.model = net.to(device).eval().requires_grad_(False)

    @property
    def input_size(self) -> int:
        """The model's square resolution, 2 ** (layer_count + 1): 256 bedroom, 1024 FFHQ."""
        return self.arch.resolution

    @property
    def feature_info(self) -> list[FeatureInfo]:
        size = self.arch.resolution
        if self.source == "encoder":
            return [FeatureInfo(f"encode_block{b}", self.arch.encoder_channels(b)[1], size // self.arch.encoder_size(b))
                    for b in self.blocks]
        return [FeatureInfo(f"decode_block{b}", self.arch.decoder_channels(b), size // self.arch.decoder_size(b))
                for b in self.blocks]

    def preprocess(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 [B, 3, H, W] -> float32 in [-1, 1] (0 -> -1, 255 -> 1), bilinearly resized to ``input_size``.

        Smaller images (FFHQ-34's 256 px for the 1024 px model) are upsampled (align_corners=False);
        larger ones are shrunk with antialiasing.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("alae", **ALAE.tiny)
            >>> x = bb.preprocess(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8))
            >>> tuple(x.shape), x.min().item()
            ((1, 3, 16, 16), 1.0)
        """
        import torch
        import torch.nn.functional as F

        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise BenchError(f"alae expects images of shape [B, 3, H, W], got {shape}")
        if images.dtype != torch.uint8:
            raise BenchError(f"alae preprocess expects uint8 images, got {images.dtype}")
        x = images.to(device=self.device, dtype=torch.float32) / 127.5 - 1
        size = self.input_size
        if tuple(x.shape[-2:]) != (size, size):
            shrink = x.shape[-2] > size or x.shape[-1] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        return x

    def forward_features(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """x in [-1, 1], [B, 3, S, S] -> the chosen block outputs, ascending, at native resolution.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("alae", **ALAE.tiny, blocks=[0, 2])
            >>> [tuple(m.shape) for m in bb.forward_features(torch.zeros(2, 3, 16, 16))]
            [(2, 16, 4, 4), (2, 4, 16, 16)]
        """
        import torch

        size = self.input_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.arch.channels, size, size):
            raise BenchError(f"alae expects inputs of shape [B, {self.arch.channels}, {size}, {size}], "
                             f"got {list(x.shape)}")
        x = x.to(device=self.device, dtype=torch.float32)
        with torch.no_grad():
            if self.source == "encoder":
                _, outputs = self.model.encode(x, last_block=max(self.blocks))
            else:
                z, _ = self.model.encode(x)
                styles = z.repeat(1, 2 * self.arch.layer_count, 1)  # the demo: one w for every style input
                outputs = self.model.decode(styles, self.noise, last_block=max(self.blocks))
        return [outputs[b] for b in self.blocks]

    def config(self) -> dict[str, Any]:
        """Base config plus blocks, source, noise seed and the architecture.

        Example:
            >>> import bench
            >>> bench.create_backbone("alae", **ALAE.tiny, seed=3).config()["seed"]
            3
        """
        from dataclasses import asdict

        cfg = super().config()
        cfg.update({"blocks": list(self.blocks), "source": self.source, "seed": self.seed,
                    "arch": asdict(self.arch)})
        return cfg
