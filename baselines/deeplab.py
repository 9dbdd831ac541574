"""DeepLabV3 for the synthetic-data baselines: torchvision's ResNet-101 model, and a small CPU variant.

The paper's DatasetGAN / DatasetDDPM rows train torchvision ``deeplabv3_resnet101`` (ResNet-101 with
dilated layer3/layer4, output stride 8; ASPP at rates 12/24/36 + image pooling; no auxiliary head)
whose backbone starts from ImageNet (baselines spec §4: the official ``pretrained=False`` only turns
off the COCO weights). We build it with no weights at all and load the ImageNet ResNet-101 file
ourselves, strictly, without executing anything from it.

``small`` is the same torchvision ``DeepLabV3`` class and forward (torchvision ResNet of bottleneck
blocks, dilated layer3/layer4, the same head structure) with one block per stage, unexpanded
bottlenecks and a 64-wide head, so the built-in 64 px demo trains on a CPU in minutes through the very same training and
evaluation code. It starts from random weights (no ImageNet file fits it).

Example:
    >>> model = build_deeplab(29, device="meta")
    >>> sum(p.numel() for p in model.state_dict().values())
    58742092
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.errors import BenchError, CheckpointError

ARCHS = ("resnet101", "small")
IMAGENET_RESNET101 = {
    "url": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "sha256_prefix": "63fe2227",  # torchvision names its files by the first 8 hex digits of the sha256
    "license": "BSD-3-Clause",
    "file": "resnet101-63fe2227.pth",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _small(num_classes: int) -> nn.Module:
    from torchvision.models import resnet
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabV3

    class SlimBottleneck(resnet.Bottleneck):
        expansion = 1  # stage outputs 64/128/256/512 instead of 256..2048: what makes it cheap

    # One block per stage, half-width bottlenecks, a 64-wide head: 2.2 M parameters; one training step
    # (batch 8, 64 px, forward + backward + Adam) measured 70 ms on one CPU thread here, against 235 ms
    # for Bottleneck blocks of full expansion.
    backbone = resnet.ResNet(SlimBottleneck, [1, 1, 1, 1], width_per_group=32,
                             replace_stride_with_dilation=[False, True, True])
    width = 64
    head = nn.Sequential(ASPP(512, [12, 24, 36], out_channels=width), nn.Conv2d(width, width, 3, padding=1, bias=False),
                         nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, num_classes, 1))
    return DeepLabV3(IntermediateLayerGetter(backbone, return_layers={"layer4": "out"}), head, None)


def build_deeplab(num_classes: int, arch: str = "resnet101", device: str | torch.device = "cpu") -> nn.Module:
    """DeepLabV3 with ``num_classes`` outputs, no weights loaded, never a download.

    Example:
        >>> m = build_deeplab(9, "small")
        >>> m.eval()(torch.zeros(1, 3, 64, 64))["out"].shape
        torch.Size([1, 9, 64, 64])
    """
    if arch not in ARCHS:
        raise BenchError(f"unknown DeepLab arch {arch!r}; use one of {', '.join(ARCHS)}")
    if int(num_classes) < 1:
        raise BenchError(f"num_classes must be positive, got {num_classes}")
    with torch.device(device):
        if arch == "small":
            return _small(int(num_classes))
        from torchvision.models.segmentation import deeplabv3_resnet101

        return deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=int(num_classes), aux_loss=None)


def imagenet_backbone_file(path: str | Path | None, *, progress: bool = True) -> Path:
    """The ImageNet ResNet-101 file: ``path`` if given, else torchvision's, downloaded into the cache.

    Example:
        >>> imagenet_backbone_file("missing.pth")
        Traceback (most recent call last):
        bench.errors.BenchError: --imagenet-weights missing.pth: no such file
    """
    from bench.hub import cache_dir, download, sha256_file

    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise BenchError(f"--imagenet-weights {path}: no such file")
        return path
    dest = cache_dir("checkpoints") / IMAGENET_RESNET101["file"]
    download(IMAGENET_RESNET101["url"], dest, progress=progress)
    digest = sha256_file(dest)
    if not digest.startswith(IMAGENET_RESNET101["sha256_prefix"]):
        raise CheckpointError(f"{dest}: sha256 {digest[:16]}... does not start with "
                              f"{IMAGENET_RESNET101['sha256_prefix']} as its name says; delete it and retry")
    return dest


def load_imagenet_backbone(model: nn.Module, path: Path) -> str:
    """Load an ImageNet ResNet-101 state dict into ``model.backbone`` strictly; returns the file's sha256.

    ``fc.*`` (the classifier) is dropped; a missing ``num_batches_tracked`` is filled with 0 (older
    files have none); any other missing or unexpected key, or a shape mismatch, fails naming it.

    Example:
        >>> load_imagenet_backbone(build_deeplab(9, "small"), Path("x.pth"))
        Traceback (most recent call last):
        bench.errors.BenchError: the small DeepLab variant has no ImageNet weights (its layers differ from ResNet-101's); use --deeplab-backbone-init random
    """
    from bench.checkpoints import load_state_dict, load_strict
    from bench.hub import sha256_file

    if len(model.backbone.layer3) != 23:
        raise BenchError("the small DeepLab variant has no ImageNet weights (its layers differ from ResNet-101's); "
                         "use --deeplab-backbone-init random")
    state = {k: v for k, v in load_state_dict(Path(path)).items() if not k.startswith("fc.")}
    own = model.backbone.state_dict()
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value, device="cpu")
    load_strict(model.backbone, state, source=str(path))
    return sha256_file(Path(path))


def preprocess(images: Any, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 images ``[B, H, W, 3]`` (numpy or tensor) -> ImageNet-normalised float ``[B, 3, H, W]``.

    Example:
        >>> import numpy as np
        >>> x = preprocess(np.zeros((1, 2, 2, 3), np.uint8))
        >>> round(float(x[0, 0, 0, 0]), 4)  # -0.485 / 0.229
        -2.1179
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise BenchError(f"DeepLab expects uint8 images [B, H, W, 3], got {x.dtype} {list(x.shape)}")
    x = x.to(device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
