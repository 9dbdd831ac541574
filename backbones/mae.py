"""``mae``: pixel features from the MAE ViT-L/8 encoders of ddpm-segmentation (protocol section 4).

The encoder is timm's ``VisionTransformer`` at image 256, patch 8 (a 32 x 32 token grid), width 1024,
24 blocks, 16 heads. Features are the outputs of the deepest 12 blocks (12..23, ascending) before the
final LayerNorm, class token dropped, each a ``[1024, 32, 32]`` map: 12288 per pixel. Inputs use the
ImageNet normalisation. MAE's encoder shuffles tokens even at mask ratio 0 and un-shuffles the result;
running the tokens in raster order gives the same values (checked to 1e-5 when the manifests were made).

Checkpoints: ``torch.save({'model': state_dict, 'optimizer', 'epoch', 'scaler', 'args'})`` with the
full autoencoder (398 keys); ``args`` is an ``argparse.Namespace``, which the safe loader allows. We keep
the encoder: the ``decoder*`` entries and ``mask_token`` are dropped, leaving the 294 keys of the model.

Example:
    >>> import bench
    >>> bench.create_backbone("mae", pretrained=False, device="meta").num_features
    12288
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from bench import Backbone, BenchError, FeatureInfo, Weights, register_backbone

if TYPE_CHECKING:  # pragma: no cover
    import torch

_YANDEX = "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/models/mae_checkpoints/"

#: MAE ViT-L/8 at 256 px (dbaranchuk/mae ``mae_vit_large_patch8``), encoder side only
VITL8_ARCH: Mapping[str, Any] = {
    "img_size": 256, "patch_size": 8, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0,
}
#: random-init test variant: the same structure, tiny (8 x 8 tokens, 4 blocks of width 32)
TINY_ARCH: Mapping[str, Any] = {
    "img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0,
}
#: checkpoint entries that belong to the MAE decoder (or masking), not to the encoder we run
_DECODER_PREFIXES = ("decoder", "mask_token")


def _mae(tag: str, paper: Mapping[str, tuple[float, float]], epochs: int) -> Weights:
    return Weights(
        tag=tag, url=(f"{_YANDEX}{tag}.pth",), domain=tag, arch=dict(VITL8_ARCH), paper_miou=paper,
        license="ddpm-segmentation hosted weights: MIT repository, no separate licence stated; MAE code CC BY-NC 4.0",
        description=f"MAE ViT-L/8 pretrained on {tag} at 256 px by the ddpm-segmentation authors ({epochs} epochs)",
    )


def convert_mae_checkpoint(state_dict: Mapping[str, "torch.Tensor"], source: str = "") -> dict[str, "torch.Tensor"]:
    """Official MAE state dict (autoencoder) -> encoder keys in timm's layout (identical names).

    Drops ``decoder*`` and ``mask_token``; strips a ``module.`` prefix that every key carries (a
    DataParallel save). An encoder-only state dict passes through unchanged.

    Example:
        >>> import torch
        >>> sorted(convert_mae_checkpoint({"cls_token": torch.zeros(1), "mask_token": torch.zeros(1),
        ...                                "decoder_pred.weight": torch.zeros(1)}))
        ['cls_token']
    """
    from backbones._checkpoint_files import drop_keys, strip_common_prefix

    return drop_keys(strip_common_prefix(state_dict, "module."), _DECODER_PREFIXES)


def build_encoder(arch: Mapping[str, Any] = VITL8_ARCH) -> "torch.nn.Module":
    """The full MAE encoder (all blocks and the final norm): the module a checkpoint must fit.

    MAE's encoder is a class-token ViT with qkv bias and LayerNorm eps 1e-6 and no head, which is
    timm's ``VisionTransformer`` with ``num_classes=0``: same keys, shapes and order.

    Example:
        >>> import torch
        >>> with torch.device("meta"):
        ...     encoder = build_encoder()
        >>> len(encoder.state_dict()), tuple(encoder.pos_embed.shape)
        (294, (1, 1025, 1024))
    """
    from functools import partial

    import torch
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=arch["img_size"], patch_size=arch["patch_size"], embed_dim=arch["embed_dim"], depth=arch["depth"],
        num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"], qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0, global_pool="token",
    )


@register_backbone("mae", "mae_vitl8")
class MAE(Backbone):
    """Block outputs of an MAE ViT encoder as pixel features.

    ``blocks`` (default: the deepest half, 12..23 for ViT-L) are 0-based encoder block indices;
    ``checkpoint`` (an official ``.pth`` or an encoder state dict, ``.pt``/``.safetensors``) replaces
    the tag's weights; ``arch`` overrides the architecture (keys of :data:`VITL8_ARCH`).

    Example:
        >>> import bench
        >>> bb = bench.create_backbone("mae", pretrained=False, device="meta")
        >>> bb.feature_info[0], len(bb.feature_info)
        (FeatureInfo(name='block12', channels=1024, stride=8), 12)
    """

    weights = {
        "lsun_bedroom": _mae("lsun_bedroom", {"bedroom_28": (45.0, 2.0), "ade_bedroom_30": (31.7, 1.8)}, 150),
        "ffhq": _mae("ffhq", {"ffhq_34": (58.8, 1.1), "celeba_19": (57.8, 0.4)}, 400),
        "lsun_cat": _mae("lsun_cat", {"cat_15": (52.4, 2.3)}, 200),
        "lsun_horse": _mae("lsun_horse", {"horse_21": (63.4, 1.4)}, 200),
    }
    default_tag = "lsun_bedroom"
    tiny = {"pretrained": False, "arch": dict(TINY_ARCH)}

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu",
                 blocks: Sequence[int] | None = None, checkpoint: str | Path | None = None,
                 arch: Mapping[str, Any] | None = None) -> None:
        super().__init__(tag=tag, pretrained=pretrained, device=device)
        import torch

        from backbones._imagenet_features import block_indices
        from backbones._checkpoint_files import load_weights, weights_path

        self.arch = self._parse_arch(arch if arch is not None else self.weights_entry.arch)
        depth = self.arch["depth"]
        self.blocks = block_indices(list(range(depth // 2, depth)) if blocks is None else blocks,
                                    limit=depth, owner="mae")
        path = weights_path(self, checkpoint, module_file=__file__)  # after validation: no wasted download
        if checkpoint is not None and tag is None:
            self.tag = None  # a user's own weights: no paper numbers attached to them
        if path is not None:
            with torch.device("meta"):  # allocates nothing; load_strict materialises the checkpoint
                model = build_encoder(self.arch)
            self._weights_sha256 = load_weights(model, path, convert_mae_checkpoint)
        elif str(device) == "meta":
            with torch.device("meta"):
                model = build_encoder(self.arch)
        else:
            model = build_encoder(self.arch)
        model.prune_intermediate_layers(list(self.blocks), prune_norm=True, prune_head=True)
        self.model = model.to(device).eval().requires_grad_(False)

    @staticmethod
    def _parse_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(arch) - set(VITL8_ARCH))
        if unknown:
            raise BenchError(f"mae arch has unknown key(s) {unknown}; known: {sorted(VITL8_ARCH)}")
        parsed = {**VITL8_ARCH, **arch}
        if parsed["img_size"] % parsed["patch_size"]:
            raise BenchError(f"mae arch img_size {parsed['img_size']} is not a multiple of patch_size "
                             f"{parsed['patch_size']}")
        if parsed["embed_dim"] % parsed["num_heads"]:
            raise BenchError(f"mae arch embed_dim {parsed['embed_dim']} is not divisible by num_heads "
                             f"{parsed['num_heads']}")
        return parsed

    @property
    def input_size(self) -> int:
        """The encoder's square image size (its position table is fixed): 256 for the official models."""
        return self.arch["img_size"]

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return [FeatureInfo(name=f"block{b}", channels=self.arch["embed_dim"], stride=self.arch["patch_size"])
                for b in self.blocks]

    def preprocess(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 [B, 3, H, W] -> ImageNet-normalised float32, resized (bilinear) to ``input_size``.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("mae", **MAE.tiny)
            >>> bb.preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape
            torch.Size([1, 3, 64, 64])
        """
        from backbones._imagenet_features import imagenet_input

        size = self.input_size
        return imagenet_input(images, owner="mae", size=(size, size), device=self.device)

    def forward_features(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """Normalised ``[B, 3, S, S]`` -> one ``[B, embed_dim, S/p, S/p]`` map per block, ascending.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("mae", **MAE.tiny)
            >>> [tuple(m.shape) for m in bb.forward_features(torch.zeros(1, 3, 64, 64))]
            [(1, 32, 8, 8), (1, 32, 8, 8)]
        """
        import torch

        from backbones._imagenet_features import vit_block_maps

        size = self.input_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise BenchError(f"mae expects inputs of shape [B, 3, {size}, {size}], got {list(x.shape)}")
        with torch.no_grad():
            return vit_block_maps(self.model, x.to(self.device), self.blocks, norm=False)

    def config(self) -> dict[str, Any]:
        """Base config plus the blocks and the architecture.

        Example:
            >>> import bench
            >>> bench.create_backbone("mae", **MAE.tiny, blocks=[0]).config()["blocks"]
            [0]
        """
        cfg = super().config()
        cfg.update({"blocks": list(self.blocks), "arch": dict(self.arch)})
        return cfg
