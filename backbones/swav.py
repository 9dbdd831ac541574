"""``swav`` (ResNet-50) and ``swav_w2`` (SwAV's ResNet-50w2): pixel features from SwAV encoders.

As in ddpm-segmentation (protocol section 4): the features are the INPUTS of the bottleneck blocks
layer1[0], layer1[2], layer2[0], layer2[2], layer3[0], layer3[2], layer3[4], layer4[0], layer4[2], in
that order: 6720 channels per pixel for ResNet-50, 13440 for the twice-wider ResNet-50w2 (every layer
doubled; this is not torchvision's ``wide_resnet50_2``). ImageNet normalisation; eval mode, so
BatchNorm uses its running statistics. Any image size works (the official inputs are 256 x 256).

Checkpoints: the ddpm-segmentation files are SwAV training states ``{'epoch', 'state_dict', 'optimizer',
'amp'?}`` whose state dict comes from DDP (every key prefixed ``module.``) and still holds the
``projection_head.*`` and ``prototypes.*`` heads; SwAV's ImageNet releases are the raw state dict.
Both load the same way: strip ``module.``, drop the heads, then a strict check of the 318 trunk keys
(the official loader is non-strict, which hides a wrong prefix).

Example:
    >>> import bench
    >>> [bench.create_backbone(n, pretrained=False, device="meta").num_features for n in ("swav", "swav_w2")]
    [6720, 13440]
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from bench import Backbone, BenchError, FeatureInfo, Weights, register_backbone

if TYPE_CHECKING:  # pragma: no cover
    import torch

_YANDEX = "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/models/"
_FAIR = "https://dl.fbaipublicfiles.com/deepcluster/"
_LICENSE_DDPM_SEG = "ddpm-segmentation hosted weights: MIT repository, no separate licence stated; SwAV code CC BY-NC 4.0"

#: the hooked blocks of the official extractor, as (stage, index) of ``layer{stage}[index]``
SPEC_BLOCKS: tuple[str, ...] = (
    "layer1.0", "layer1.2", "layer2.0", "layer2.2", "layer3.0", "layer3.2", "layer3.4", "layer4.0", "layer4.2",
)
#: checkpoint entries of SwAV's training heads, absent from the trunk we run
_HEAD_PREFIXES = ("projection_head.", "prototypes.")


def convert_swav_checkpoint(state_dict: Mapping[str, "torch.Tensor"], source: str = "") -> dict[str, "torch.Tensor"]:
    """SwAV state dict (DDP ``module.`` keys, with heads) -> trunk keys in torchvision's layout.

    Example:
        >>> import torch
        >>> sorted(convert_swav_checkpoint({"module.conv1.weight": torch.zeros(1),
        ...                                 "module.prototypes.weight": torch.zeros(1)}))
        ['conv1.weight']
    """
    from backbones._checkpoint_files import drop_keys, strip_common_prefix

    return drop_keys(strip_common_prefix(state_dict, "module."), _HEAD_PREFIXES)


def _parse_block(name: Any) -> tuple[int, int]:
    from backbones._resnet import DEPTHS

    stage, index = -1, -1
    if isinstance(name, str) and name.startswith("layer") and "." in name:
        head, _, tail = name[len("layer"):].partition(".")
        if head.isdigit() and tail.isdigit():
            stage, index = int(head), int(tail)
    if not (1 <= stage <= len(DEPTHS) and 0 <= index < DEPTHS[stage - 1]):
        valid = ", ".join(f"layer{s}.0..{d - 1}" for s, d in enumerate(DEPTHS, start=1))
        raise BenchError(f"swav block {name!r} is not a ResNet-50 bottleneck block; valid: {valid}")
    return stage, index


class _SwAVBase(Backbone):
    """Shared code of ``swav`` and ``swav_w2``; subclasses set ``base`` and the weights table.

    ``blocks`` names the bottleneck blocks whose inputs are returned (default: :data:`SPEC_BLOCKS`);
    ``checkpoint`` replaces the tag's weights; ``base`` overrides the stem width (tests: a tiny net).
    """

    #: stem width: 64 for ResNet-50, 128 for ResNet-50w2
    base: ClassVar[int] = 64

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu",
                 blocks: Sequence[str] = SPEC_BLOCKS, checkpoint: str | Path | None = None,
                 base: int | None = None) -> None:
        super().__init__(tag=tag, pretrained=pretrained, device=device)
        import torch

        from backbones._resnet import ResNet50
        from backbones._checkpoint_files import load_weights, weights_path

        if isinstance(blocks, str) or not isinstance(blocks, Sequence) or not blocks:
            raise BenchError(f"{self.name} blocks must be a non-empty list of names like 'layer3.4', got {blocks!r}")
        parsed = [_parse_block(b) for b in blocks]
        if len(set(parsed)) != len(parsed):
            raise BenchError(f"{self.name} blocks list a block twice: {list(blocks)!r}")
        self.blocks = tuple(sorted(parsed))  # network order, the order the maps come out in
        self.width = int(base) if base is not None else type(self).base
        if self.width <= 0:
            raise BenchError(f"{self.name} base width must be positive, got {base!r}")

        path = weights_path(self, checkpoint, module_file=__file__)
        if checkpoint is not None and tag is None:
            self.tag = None
        if path is not None:
            with torch.device("meta"):
                model = ResNet50(self.width)
            self._weights_sha256 = load_weights(model, path, convert_swav_checkpoint)
        elif str(device) == "meta":
            with torch.device("meta"):
                model = ResNet50(self.width)
        else:
            model = ResNet50(self.width)
        self.model = model.to(device).eval().requires_grad_(False)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return [FeatureInfo(name=f"layer{s}.{i}.input", channels=self.model.block_input_channels(s, i),
                            stride=self.model.block_input_stride(s, i)) for s, i in self.blocks]

    def preprocess(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 [B, 3, H, W] -> ImageNet-normalised float32 on the device (no resize).

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("swav", **SwAV.tiny)
            >>> x = bb.preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
            >>> round(x[0, 0, 0, 0].item(), 4)  # -0.485 / 0.229
            -2.1179
        """
        from backbones._imagenet_features import imagenet_input

        return imagenet_input(images, owner=self.name, device=self.device)

    def forward_features(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """Normalised ``[B, 3, H, W]`` -> the inputs of the chosen blocks, in network order.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("swav", **SwAV.tiny, blocks=["layer1.0", "layer4.2"])
            >>> [tuple(m.shape) for m in bb.forward_features(torch.zeros(1, 3, 64, 64))]
            [(1, 8, 16, 16), (1, 256, 2, 2)]
        """
        import torch

        if x.dim() != 4 or x.shape[1] != 3:
            raise BenchError(f"{self.name} expects inputs of shape [B, 3, H, W], got {list(x.shape)}")
        with torch.no_grad():
            return self.model.forward_block_inputs(x.to(self.device), self.blocks)

    def config(self) -> dict[str, Any]:
        """Base config plus the hooked blocks and the stem width.

        Example:
            >>> import bench
            >>> bench.create_backbone("swav", pretrained=False, device="meta").config()["blocks"][:2]
            ['layer1.0', 'layer1.2']
        """
        cfg = super().config()
        cfg.update({"blocks": [f"layer{s}.{i}" for s, i in self.blocks], "base": self.width})
        return cfg


def _swav(tag: str, folder: str, arch: str, paper: Mapping[str, tuple[float, float]], recipe: str) -> Weights:
    return Weights(tag=tag, url=(f"{_YANDEX}{folder}/{tag}.pth",), domain=tag, license=_LICENSE_DDPM_SEG,
                   arch={"resnet": arch}, paper_miou=paper,
                   description=f"SwAV {arch} pretrained on {tag} by the ddpm-segmentation authors ({recipe})")


@register_backbone("swav", "swav_rn50")
class SwAV(_SwAVBase):
    """SwAV ResNet-50: block inputs, 6720 channels per pixel (ddpm-segmentation README's SwAV row).

    Example:
        >>> import bench
        >>> bench.get_backbone_class("swav").weights["lsun_cat"].paper_miou
        {'cat_15': (44.1, 2.1)}
    """

    base = 64
    weights = {
        "lsun_bedroom": _swav("lsun_bedroom", "swav_checkpoints", "ResNet-50",
                              {"bedroom_28": (41.0, 2.3), "ade_bedroom_30": (30.3, 1.5)}, "200 epochs"),
        "ffhq": _swav("ffhq", "swav_checkpoints", "ResNet-50",
                      {"ffhq_34": (54.7, 1.4), "celeba_19": (53.2, 1.0)}, "400 epochs"),
        "lsun_cat": _swav("lsun_cat", "swav_checkpoints", "ResNet-50", {"cat_15": (44.1, 2.1)}, "200 epochs"),
        "lsun_horse": _swav("lsun_horse", "swav_checkpoints", "ResNet-50", {"horse_21": (51.7, 0.5)}, "200 epochs"),
        "imagenet": Weights(
            tag="imagenet", url=(f"{_FAIR}swav_800ep_pretrain.pth.tar",), domain="imagenet",
            license="CC BY-NC 4.0 (facebookresearch/swav)", arch={"resnet": "ResNet-50"},
            description="SwAV's own ImageNet ResNet-50, 800 epochs (raw state dict with module. keys)",
        ),
    }
    default_tag = "lsun_bedroom"
    tiny = {"pretrained": False, "base": 8}


@register_backbone("swav_w2", "swav_rn50w2", "swavw2")
class SwAVw2(_SwAVBase):
    """SwAV ResNet-50w2: block inputs, 13440 channels per pixel; the paper's Table 2 "SwAV" row.

    Example:
        >>> import bench
        >>> bench.get_backbone_class("swav_w2").weights["lsun_horse"].paper_miou
        {'horse_21': (54.0, 0.9)}
    """

    base = 128
    weights = {
        "lsun_bedroom": _swav("lsun_bedroom", "swav_w2_checkpoints", "ResNet-50w2",
                              {"bedroom_28": (42.4, 1.7), "ade_bedroom_30": (30.6, 1.6)}, "200 epochs"),
        "ffhq": _swav("ffhq", "swav_w2_checkpoints", "ResNet-50w2",
                      {"ffhq_34": (56.9, 1.3), "celeba_19": (52.4, 1.3)}, "400 epochs"),
        "lsun_cat": _swav("lsun_cat", "swav_w2_checkpoints", "ResNet-50w2", {"cat_15": (45.1, 2.1)}, "200 epochs"),
        "lsun_horse": _swav("lsun_horse", "swav_w2_checkpoints", "ResNet-50w2",
                            {"horse_21": (54.0, 0.9)}, "200 epochs"),
        "imagenet": Weights(
            tag="imagenet", url=(f"{_FAIR}swav_RN50w2_400ep_pretrain.pth.tar",), domain="imagenet",
            license="CC BY-NC 4.0 (facebookresearch/swav)", arch={"resnet": "ResNet-50w2"},
            description="SwAV's own ImageNet ResNet-50w2, 400 epochs (raw state dict with module. keys)",
        ),
    }
    default_tag = "lsun_bedroom"
    tiny = {"pretrained": False, "base": 16}
