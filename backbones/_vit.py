"""Shared helpers of the ImageNet-style plugins (mae, dinov2, swav, timm): input checks and
normalisation, block-index validation, weight-file resolution, and ViT block outputs as maps.

Everything here is private to ``backbones``; the public contract is :class:`bench.Backbone`.

Example:
    >>> import torch
    >>> x = imagenet_input(torch.full((1, 3, 4, 4), 255, dtype=torch.uint8), owner="mae")
    >>> round(x[0, 0, 0, 0].item(), 4)  # (1 - 0.485) / 0.229
    2.2489
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from bench.errors import BenchError, CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from bench.contract import Backbone

#: ImageNet statistics (protocol section 2), RGB order, for inputs scaled to [0, 1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_input(images: torch.Tensor, *, owner: str, size: tuple[int, int] | None = None,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float32 ``(v/255 - mean) / std`` on ``device``, resized to ``size``.

    The resize is bilinear (align_corners=False) on the [0, 1] image, antialiased when shrinking so
    that it behaves like the PIL resize of the official pipeline; no resize when the size already fits.

    Example:
        >>> imagenet_input(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), owner="x", size=(70, 70)).shape
        torch.Size([2, 3, 70, 70])
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise BenchError(f"{owner} expects images of shape [B, 3, H, W], got {shape}")
    if images.dtype != torch.uint8:
        raise BenchError(f"{owner} preprocess expects uint8 images, got {images.dtype}")
    x = images.to(device=device, dtype=torch.float32) / 255.0
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def block_indices(values: Any, *, limit: int, owner: str, what: str = "blocks") -> tuple[int, ...]:
    """Validate user indices: a non-empty list of distinct integers in ``0..limit-1``; sorted ascending.

    Example:
        >>> block_indices([23, 12], limit=24, owner="mae")
        (12, 23)
        >>> block_indices([24], limit=24, owner="mae")
        Traceback (most recent call last):
        bench.errors.BenchError: mae block 24 is out of range; valid blocks are 0..23
    """
    from bench.contract import validate_indices

    return tuple(sorted(validate_indices(values, limit=limit, owner=owner, what=what)))


def weights_path(backbone: "Backbone", checkpoint: str | Path | None, *, module_file: str) -> Path | None:
    """The file to load: the user's ``checkpoint``, else the tag's download (sha256-verified when the
    table knows it) when ``backbone.pretrained``; None for random weights.

    Example:
        >>> import bench
        >>> weights_path(bench.create_backbone("swav", pretrained=False, device="meta"), None, module_file=".") is None
        True
    """
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"{backbone.name} checkpoint file not found: {path}")
        # A random-init control never loads weights, the user's file included.
        return path if backbone.pretrained else None
    if not backbone.pretrained:
        return None
    from bench.hub import fetch_weights

    return fetch_weights(backbone.weights_entry, module_file=module_file, name=f"{backbone.name}.{backbone.tag}")


def load_weights(model: torch.nn.Module, path: Path,
                 convert: Callable[[dict[str, torch.Tensor], str], Mapping[str, torch.Tensor]]) -> str:
    """Read ``path`` safely, ``convert`` its keys to the model's layout, load strictly; returns its sha256.

    ``convert(state_dict, source)`` does the documented prefix/head handling of one checkpoint format.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "ck.pt"
        >>> torch.save({"state_dict": {"module.weight": torch.ones(1, 2), "module.bias": torch.zeros(1)}}, path)
        >>> layer = torch.nn.Linear(2, 1)
        >>> len(load_weights(layer, path, lambda sd, source: strip_common_prefix(sd, "module."))), layer.weight.sum().item()
        (64, 2.0)
    """
    from bench.checkpoints import load_state_dict, load_strict
    from bench.hub import sha256_file

    load_strict(model, convert(load_state_dict(path), str(path)), source=str(path))
    return sha256_file(path)


def drop_keys(state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The entries whose key starts with none of ``prefixes`` (heads and decoders we do not use).

    Example:
        >>> sorted(drop_keys({"decoder_embed.weight": 1, "mask_token": 2, "norm.bias": 3}, ["decoder", "mask_token"]))
        ['norm.bias']
    """
    return {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in prefixes)}


def strip_common_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` when EVERY key carries it (a DataParallel/DDP save); otherwise leave keys alone.

    Example:
        >>> strip_common_prefix({"module.a": 1, "module.b": 2}, "module."), strip_common_prefix({"a": 1}, "module.")
        ({'a': 1, 'b': 2}, {'a': 1})
    """
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        from bench.checkpoints import strip_prefix

        return strip_prefix(state_dict, prefix)
    return dict(state_dict)


def vit_block_maps(model: torch.nn.Module, x: torch.Tensor, blocks: Sequence[int], *, norm: bool) -> list[torch.Tensor]:
    """Outputs of a timm ``VisionTransformer``'s ``blocks`` as ``[B, C, H/p, W/p]`` maps, ascending.

    Class and register tokens are dropped, patch tokens go back to raster order (token k at row
    k // W, column k % W); ``norm`` applies the final LayerNorm to each output (DINOv2's convention,
    not MAE's). Blocks after the deepest requested one are not run.

    Example:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, num_classes=0)
        >>> [tuple(m.shape) for m in vit_block_maps(vit.eval(), torch.zeros(1, 3, 32, 32), [0, 2], norm=False)]
        [(1, 16, 4, 4), (1, 16, 4, 4)]
    """
    return model.forward_intermediates(
        x, indices=list(blocks), norm=norm, stop_early=True, output_fmt="NCHW", intermediates_only=True
    )
