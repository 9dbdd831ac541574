"""The backbone plugin contract.

A backbone turns a batch of uint8 RGB images into a list of feature maps at their native resolution.
Everything downstream (feature cache, pixel sampler, probe, metrics) is shared, so a backbone file only
declares *what* it computes:

- ``weights``: a table of :class:`Weights` (tag -> url, sha256, domain, license, architecture, the
  paper's mIoU) kept as data next to the code, in the spirit of torchvision's weight enums;
- ``feature_info``: one :class:`FeatureInfo` per output map, in output order;
- ``preprocess``: uint8 ``[B, 3, H, W]`` -> model input;
- ``forward_features``: model input -> ``list[Tensor[B, C_i, H_i, W_i]]`` (no upsampling);
- ``tiny``: constructor arguments for a tiny random-init variant, used by the contract test.

Importing this module does not import torch: plugin modules stay cheap to import (``bench ls``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from bench.errors import BenchError

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class FeatureInfo:
    """One output map of a backbone.

    Example:
        >>> FeatureInfo(name="t50.block5", channels=1024, stride=8)
        FeatureInfo(name='t50.block5', channels=1024, stride=8)
    """

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class Weights:
    """A pretrained checkpoint declared as data.

    ``url`` lists mirrors in order of preference; ``sha256`` is empty until known and verified
    whenever set; ``file`` names a checkpoint shipped inside the repository (relative to the plugin
    module). ``paper_miou`` maps dataset names to the paper's (mean, std) mIoU in percent.

    Example:
        >>> w = Weights(tag="lsun_cat", url=("https://example.org/lsun_cat.pt",), domain="lsun_cat")
        >>> w.tag, w.domain
        ('lsun_cat', 'lsun_cat')
    """

    tag: str
    url: tuple[str, ...] = ()
    sha256: str = ""
    domain: str = ""
    license: str = ""
    arch: Mapping[str, Any] = field(default_factory=dict)
    paper_miou: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    file: str = ""
    description: str = ""


def validate_indices(values: Any, *, limit: int, owner: str, what: str = "blocks", item: str = "",
                     allow_negative: bool = False) -> list[int]:
    """Check a plugin's user-given layer/step indices: a non-empty list of distinct integers.

    Valid values are ``0..limit-1`` (and ``-limit..-1``, counted from the end, if ``allow_negative``);
    the result keeps the user's order with negatives resolved. Errors name the value and the range,
    never silently drop an index.

    Example:
        >>> validate_indices([12, 5], limit=18, owner="ddpm")
        [12, 5]
        >>> validate_indices(6, limit=18, owner="ddpm")  # one index, as `--set blocks=6` gives it
        [6]
        >>> validate_indices([18], limit=18, owner="ddpm")
        Traceback (most recent call last):
        bench.errors.BenchError: ddpm block 18 is out of range; valid blocks are 0..17
    """
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise BenchError(f"{owner} {what} must be a non-empty list of integers, got {values!r}")
    item = item or what[:-1]  # "blocks" -> "block"
    low = -limit if allow_negative else 0
    valid = f"0..{limit - 1}" + (f" (or {-limit}..-1 from the end)" if allow_negative else "")
    seen: list[int] = []
    for v in values:
        try:
            index = None if isinstance(v, bool) else operator.index(v)
        except TypeError:
            index = None
        if index is None or not low <= index < limit:
            raise BenchError(f"{owner} {item} {v!r} is out of range; valid {what} are {valid}")
        index %= limit
        if index in seen:
            raise BenchError(f"{owner} {what} lists {index} twice: {list(values)!r}")
        seen.append(index)
    return seen


class Backbone:
    """Base class of every backbone plugin.

    Subclasses are registered with :func:`bench.register_backbone` and built with
    :func:`bench.create_backbone`. The constructor receives ``tag`` (a key of ``weights`` or None),
    ``pretrained`` (False: random init, no download), ``device`` and the plugin's own keyword
    arguments (layers, timesteps, ...), and must reject invalid ones with a :class:`BenchError`.

    Example:
        >>> import bench
        >>> bb = bench.create_backbone("pixels")
        >>> [f.channels for f in bb.feature_info]
        [5]
    """

    #: registered name and aliases (set by ``register_backbone``)
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    #: tag -> Weights; empty for backbones that need no weights
    weights: ClassVar[Mapping[str, Weights]] = {}
    #: tag used when neither the user nor the dataset domain picks one
    default_tag: ClassVar[str | None] = None
    #: constructor kwargs of a tiny random-init variant for tests
    tiny: ClassVar[Mapping[str, Any]] = {}
    #: if set, ``"arch:value"`` names pass ``value`` as this keyword (``timm:convnext_base`` -> model=...)
    variant_arg: ClassVar[str | None] = None
    #: bump when a fix changes what ``forward_features`` returns: cached features of older versions are
    #: then never served again (part of ``config()``, hence of the feature-cache and run keys)
    feature_version: ClassVar[int] = 1

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu") -> None:
        if tag is None:
            tag = self.default_tag
        if self.weights and tag not in self.weights:
            raise BenchError(
                f"backbone {self.name!r} has no weights tag {tag!r}; known tags: {', '.join(self.weights)}"
            )
        self.tag = tag
        self.pretrained = pretrained
        self.device = device

    # ---- what a plugin must provide -------------------------------------------------------------
    @property
    def feature_info(self) -> Sequence[FeatureInfo]:
        """The output maps, in the order ``forward_features`` returns them."""
        raise NotImplementedError

    def preprocess(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 ``[B, 3, H, W]`` -> the model's input tensor on ``self.device``."""
        raise NotImplementedError

    def forward_features(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """Model input -> native-resolution maps ``[B, C_i, H/stride_i, W/stride_i]``."""
        raise NotImplementedError

    @property
    def input_size(self) -> int | None:
        """The square input size the model needs, or None when any size works."""
        return None

    # ---- shared behaviour -----------------------------------------------------------------------
    @property
    def num_features(self) -> int:
        """Channels per pixel after upsampling and concatenation."""
        return sum(f.channels for f in self.feature_info)

    @property
    def weights_entry(self) -> Weights | None:
        """The :class:`Weights` of the current tag, if any."""
        return self.weights.get(self.tag) if self.tag is not None else None

    def weights_sha256(self) -> str:
        """sha256 of the loaded weights ('' when random or unknown); part of the feature-cache key."""
        return getattr(self, "_weights_sha256", "")

    def config(self) -> dict[str, Any]:
        """Everything that determines the features (JSON-serialisable); part of the cache key.

        Plugins extend it with their layers, timesteps, noise seed, ...
        """
        return {
            "backbone": self.name,
            "feature_version": self.feature_version,
            "tag": self.tag,
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256(),
            "feature_info": [[f.name, f.channels, f.stride] for f in self.feature_info],
        }

    def extract(self, images: "torch.Tensor") -> list["torch.Tensor"]:
        """uint8 images -> native maps, without autograd.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("pixels")
            >>> [m.shape for m in bb.extract(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))]
            [torch.Size([1, 5, 8, 8])]
        """
        import torch

        images = images_to_device(images, self.device)
        with torch.inference_mode():
            return self.forward_features(self.preprocess(images))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tag={self.tag!r}, features={self.num_features})"


def images_to_device(images: "torch.Tensor", device: str) -> "torch.Tensor":
    """The uint8 batch on ``device`` before ``preprocess``: on CUDA through pinned memory, non-blocking.

    The images cross the bus as uint8 (a quarter of float32's bytes) and the copy is queued behind
    the previous batch's work instead of stalling it; every plugin's own ``.to(self.device)`` is then
    a no-op. Elsewhere the batch is returned as it is.

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
        >>> images_to_device(x, "cpu") is x
        True
    """
    if not str(device).startswith("cuda") or images.device.type != "cpu":
        return images
    return images.pin_memory().to(device, non_blocking=True)
