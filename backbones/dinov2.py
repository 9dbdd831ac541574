"""``dinov2``: pixel features from DINOv2 ViTs (Oquab et al., 2023), on timm's architectures.

``model`` picks the network: ``vits14``, ``vitb14``, ``vitl14``, ``vitg14`` and their ``_reg`` variants
with 4 register tokens (Darcet et al., 2024); it is also the weights tag, so ``dinov2:vitl14``,
``dinov2.vitl14`` and ``create_backbone("dinov2", model="vitl14")`` are the same backbone. Features are
the patch tokens of the chosen blocks (default: the last 4) after the final LayerNorm (DINOv2's
``get_intermediate_layers`` convention; ``norm=False`` skips it), reshaped to ``[C, H/14, W/14]`` maps;
class and register tokens are dropped.

Any image size works: ``preprocess`` resizes (bilinear) up to the next multiple of the patch size when
needed (a 64 px image becomes 70 px -> 5 x 5 maps) and the position table is resampled (bicubic) to the
token grid. The pixel sampler upsamples the native maps to the image, so the declared stride is the patch.

The official checkpoints (``dinov2_vits14_pretrain.pth``, ...) are raw state dicts in Meta's layout;
loading converts it to timm's (:func:`convert_dinov2_checkpoint`) and then checks every key and shape.

Example:
    >>> import bench
    >>> bb = bench.create_backbone("dinov2:vitb14", pretrained=False, device="meta")
    >>> bb.num_features, bb.feature_info[0]
    (3072, FeatureInfo(name='block8', channels=768, stride=14))
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from bench import Backbone, BenchError, FeatureInfo, Weights, register_backbone

if TYPE_CHECKING:  # pragma: no cover
    import torch

_FAIR = "https://dl.fbaipublicfiles.com/dinov2/"
PATCH = 14

#: our model names -> (timm architecture, depth, width)
MODELS: Mapping[str, tuple[str, int, int]] = {
    "vits14": ("vit_small_patch14_dinov2", 12, 384),
    "vitb14": ("vit_base_patch14_dinov2", 12, 768),
    "vitl14": ("vit_large_patch14_dinov2", 24, 1024),
    "vitg14": ("vit_giant_patch14_dinov2", 40, 1536),
    "vits14_reg": ("vit_small_patch14_reg4_dinov2", 12, 384),
    "vitb14_reg": ("vit_base_patch14_reg4_dinov2", 12, 768),
    "vitl14_reg": ("vit_large_patch14_reg4_dinov2", 24, 1024),
    "vitg14_reg": ("vit_giant_patch14_reg4_dinov2", 40, 1536),
}


def _official(model: str) -> Weights:
    size = model[:6]  # "vits14"
    file = f"dinov2_{size}_reg4_pretrain.pth" if model.endswith("_reg") else f"dinov2_{size}_pretrain.pth"
    timm_name, depth, width = MODELS[model]
    return Weights(
        tag=model, url=(f"{_FAIR}dinov2_{size}/{file}",), domain="lvd142m", license="Apache-2.0",
        arch={"timm": timm_name, "depth": depth, "width": width, "patch": PATCH},
        description=f"official DINOv2 {size.upper()}{' with 4 registers' if model.endswith('_reg') else ''} "
                    f"(LVD-142M, 518 px)",
    )


def convert_dinov2_checkpoint(state_dict: Mapping[str, "torch.Tensor"], source: str = "") -> dict[str, "torch.Tensor"]:
    """Meta's DINOv2 layout -> timm's; a state dict already in timm's layout passes unchanged.

    - ``mask_token`` (used only in training) is dropped;
    - register models: ``register_tokens`` -> ``reg_token``; Meta adds ``pos_embed[:, 0]`` to the class
      token inside the forward, timm's register models keep no class position (``no_embed_class``), so
      that row is folded into ``cls_token`` and removed from ``pos_embed``;
    - ViT-g's SwiGLU MLP: ``mlp.w12`` (the fused gate and value projections) -> ``mlp.fc1``, ``mlp.w3`` -> ``mlp.fc2``.

    Example:
        >>> import torch
        >>> sd = {"cls_token": torch.zeros(1, 1, 2), "pos_embed": torch.ones(1, 5, 2),
        ...       "register_tokens": torch.zeros(1, 4, 2), "mask_token": torch.zeros(1, 2)}
        >>> out = convert_dinov2_checkpoint(sd)
        >>> sorted(out), out["cls_token"].flatten().tolist(), tuple(out["pos_embed"].shape)
        (['cls_token', 'pos_embed', 'reg_token'], [1.0, 1.0], (1, 4, 2))
    """
    out: dict[str, "torch.Tensor"] = {}
    registers = "register_tokens" in state_dict
    for key, value in state_dict.items():
        if key == "mask_token":
            continue
        if registers and key == "register_tokens":
            key = "reg_token"
        elif registers and key == "cls_token":
            value = value + state_dict["pos_embed"][:, :1]
        elif registers and key == "pos_embed":
            value = value[:, 1:]
        parts = key.split(".")
        if len(parts) == 5 and parts[0] == "blocks" and parts[2] == "mlp" and parts[3] in ("w12", "w3"):
            parts[3] = "fc1" if parts[3] == "w12" else "fc2"
            key = ".".join(parts)
        out[key] = value
    return out


@register_backbone("dinov2")
class DINOv2(Backbone):
    """Patch tokens of DINOv2 blocks as pixel features.

    ``model`` (default: the tag, else ``vits14``) names the network, ``blocks`` the 0-based blocks
    (default: the last 4), ``norm`` whether the final LayerNorm is applied to them, ``checkpoint`` a local
    file (official ``.pth`` or timm layout ``.safetensors``) replacing the download.

    Example:
        >>> import bench
        >>> bench.create_backbone("dinov2", model="vitl14_reg", pretrained=False, device="meta").num_features
        4096
    """

    weights = {name: _official(name) for name in MODELS}
    default_tag = "vits14"
    variant_arg = "model"
    tiny = {"pretrained": False, "model": "vits14", "blocks": (0, 1)}

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu",
                 model: str | None = None, blocks: Sequence[int] | None = None, norm: bool = True,
                 checkpoint: str | Path | None = None) -> None:
        if model is not None:
            if model not in MODELS:
                import difflib

                close = difflib.get_close_matches(str(model), list(MODELS), n=2, cutoff=0.5)
                hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
                raise BenchError(f"dinov2 has no model {model!r}{hint} (known: {', '.join(MODELS)})")
            # The model names its weights: it wins over a tag picked by default (runner, default_tag);
            # a different explicit tag would be ambiguous.
            if tag not in (None, model, self.default_tag):
                raise BenchError(f"dinov2 model {model!r} and weights tag {tag!r} disagree; give one of them")
            tag = model
        super().__init__(tag=tag, pretrained=pretrained, device=device)
        import torch

        from backbones._imagenet_features import block_indices
        from backbones._checkpoint_files import load_weights, weights_path

        self.model_name = self.tag
        self.timm_name, depth, self.width = MODELS[self.model_name]
        self.blocks = block_indices(list(range(depth - 4, depth)) if blocks is None else blocks,
                                    limit=depth, owner=f"dinov2 {self.model_name}")
        if not isinstance(norm, bool):
            raise BenchError(f"dinov2 norm must be true or false, got {norm!r}")
        self.norm = norm
        path = weights_path(self, checkpoint, module_file=__file__)
        if path is not None:
            with torch.device("meta"):
                net = self._build()
            self._weights_sha256 = load_weights(net, path, convert_dinov2_checkpoint)
        elif str(device) == "meta":
            with torch.device("meta"):
                net = self._build()
        else:
            net = self._build()
        net.prune_intermediate_layers(list(self.blocks), prune_norm=not norm, prune_head=True)
        self.model = net.to(device).eval().requires_grad_(False)

    def _build(self) -> "torch.nn.Module":
        import timm

        # dynamic_img_size: any token grid, the 37 x 37 position table (518 px) is resampled per input.
        return timm.create_model(self.timm_name, pretrained=False, dynamic_img_size=True)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return [FeatureInfo(name=f"block{b}", channels=self.width, stride=PATCH) for b in self.blocks]

    def preprocess(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 [B, 3, H, W] -> ImageNet-normalised float32, H and W rounded up to multiples of 14.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("dinov2", **DINOv2.tiny)
            >>> bb.preprocess(torch.zeros(1, 3, 64, 84, dtype=torch.uint8)).shape
            torch.Size([1, 3, 70, 84])
        """
        from backbones._imagenet_features import imagenet_input

        height, width = (int(s) for s in images.shape[-2:]) if images.dim() == 4 else (0, 0)
        size = (math.ceil(height / PATCH) * PATCH, math.ceil(width / PATCH) * PATCH)
        return imagenet_input(images, owner="dinov2", size=size, device=self.device)

    def forward_features(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """Normalised ``[B, 3, H, W]`` (multiples of 14) -> ``[B, width, H/14, W/14]`` per block, ascending.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("dinov2", **DINOv2.tiny)
            >>> [tuple(m.shape) for m in bb.forward_features(torch.zeros(1, 3, 70, 28))]
            [(1, 384, 5, 2), (1, 384, 5, 2)]
        """
        import torch

        from backbones._imagenet_features import vit_block_maps

        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2] % PATCH or x.shape[-1] % PATCH:
            raise BenchError(f"dinov2 expects inputs [B, 3, H, W] with H and W multiples of {PATCH}, "
                             f"got {list(x.shape)} (preprocess rounds the size up)")
        with torch.no_grad():
            return vit_block_maps(self.model, x.to(self.device), self.blocks, norm=self.norm)

    def config(self) -> dict[str, Any]:
        """Base config plus the model, its timm architecture, the blocks and the norm flag.

        Example:
            >>> import bench
            >>> bench.create_backbone("dinov2", **DINOv2.tiny).config()["timm"]
            'vit_small_patch14_dinov2'
        """
        cfg = super().config()
        cfg.update({"model": self.model_name, "timm": self.timm_name, "blocks": list(self.blocks),
                    "norm": self.norm})
        return cfg
