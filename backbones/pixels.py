"""``pixels``: the raw colour and position of each pixel; an honest lower bound for every report.

Five features per pixel: R, G, B scaled to [0, 1] and the x, y position scaled to [-1, 1]. A probe
that beats this row learned something the colour and position alone do not say.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from bench import Backbone, FeatureInfo, register_backbone

if TYPE_CHECKING:  # pragma: no cover
    import torch


@register_backbone("pixels", "rgb")
class Pixels(Backbone):
    """RGB + normalised (x, y) per pixel; needs no weights.

    Example:
        >>> import torch, bench
        >>> maps = bench.create_backbone("pixels").extract(torch.full((1, 3, 4, 4), 255, dtype=torch.uint8))
        >>> maps[0][0, :, 0, 0].tolist()
        [1.0, 1.0, 1.0, -0.75, -0.75]
    """

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu") -> None:
        super().__init__(tag=tag, pretrained=pretrained, device=device)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return [FeatureInfo(name="rgbxy", channels=5, stride=1)]

    def preprocess(self, images: "torch.Tensor") -> "torch.Tensor":
        return images.to(self.device).float() / 255.0

    def forward_features(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        import torch

        b, _, h, w = x.shape
        # Pixel centres in [-1, 1], the same convention as align_corners=False sampling.
        ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h * 2 - 1
        xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w * 2 - 1
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        pos = torch.stack([grid_x, grid_y]).expand(b, 2, h, w)
        return [torch.cat([x, pos], dim=1)]
