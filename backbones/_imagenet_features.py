"""Inputs and feature maps of the ImageNet-style plugins (mae, dinov2, swav, timm).

ImageNet normalisation of uint8 images, validation of user-given block indices, and the outputs of
a timm ViT's blocks as native-resolution maps. Private to ``backbones``; the public contract is
:class:`bench.Backbone`.

Example:
    >>> import torch
    >>> x = imagenet_input(torch.full((1, 3, 4, 4), 255, dtype=torch.uint8), owner="mae")
    >>> round(x[0, 0, 0, 0].item(), 4)  # (1 - 0.485) / 0.229
    2.2489
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from bench.errors import BenchError

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
