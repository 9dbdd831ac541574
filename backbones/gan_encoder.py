"""``gan_encoder``: the e4e encoder's own activations as pixel features (Table 2 "GAN Encoder", spec 2.2, D11).

The image is resized to 256, mapped to [-1, 1] and run through the e4e IR-SE50 body (eval-mode
BatchNorm). Default features (``layers="body"``): the outputs of the 24 IR-SE units, 64@128 x 3,
128@64 x 4, 256@32 x 14, 512@16 x 3 = **5824** per pixel. ``layers="fpn"``: the pyramid c1, c2, c3,
p2, p1 (128 + 256 + 512 + 512 + 512 = **1920**). Any list of ``input_layer``, ``body.<i>``, ``c1``,
``c2``, ``c3``, ``p2``, ``p1`` also works. The style heads are loaded (strictly) but not run.

Weights: the official e4e checkpoints (FFHQ, LSUN-Horse); none exists for Cat or Bedroom, pass
``--weights`` there (see :mod:`backbones._e4e_common`).

Example:
    >>> import bench
    >>> [bench.create_backbone("gan_encoder", pretrained=False, device="meta", layers=l).num_features
    ...  for l in ("body", "fpn")]
    [5824, 1920]
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from backbones._e4e_common import TINY_ARCH, E4EBackbone, e4e_weights
from bench import BenchError, FeatureInfo, register_backbone

if TYPE_CHECKING:  # pragma: no cover
    import torch

FPN_MAPS = ("c1", "c2", "c3", "p2", "p1")
#: output stride of each pyramid map (c1: end of stage 2, c2/p2: stage 3, c3: stage 4, p1: stage 2)
_FPN_STRIDES = {"c1": 4, "c2": 8, "c3": 16, "p2": 8, "p1": 4}
_FPN_STAGE = {"c1": 1, "c2": 2, "c3": 3, "p2": 3, "p1": 3}  # index into stage_channels


def body_layers(stage_units: Sequence[int]) -> list[str]:
    """``body.0`` ... one name per IR-SE unit.

    Example:
        >>> body_layers([1, 2, 1, 1])
        ['body.0', 'body.1', 'body.2', 'body.3', 'body.4']
    """
    return [f"body.{i}" for i in range(sum(stage_units))]


def parse_layers(layers: Any, *, owner: str) -> tuple[str, ...]:
    """``"body"``, ``"fpn"`` or a list of map names, checked for syntax and repeats (not yet ranges).

    Example:
        >>> parse_layers("fpn", owner="gan_encoder")
        ('c1', 'c2', 'c3', 'p2', 'p1')
    """
    if layers == "body":
        return ("body",)
    if layers == "fpn":
        return FPN_MAPS
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise BenchError(f"{owner} layers must be 'body', 'fpn' or a non-empty list of map names, got {layers!r}")
    for name in layers:
        ok = isinstance(name, str) and (name in FPN_MAPS or name == "input_layer" or (
            name.startswith("body.") and name[5:].isdigit()))
        if not ok:
            raise BenchError(f"{owner} layer {name!r} is not a map name; use input_layer, body.<i>, "
                             f"c1, c2, c3, p2 or p1")
    if len(set(layers)) != len(layers):
        raise BenchError(f"{owner} layers list a map twice: {list(layers)!r}")
    return tuple(layers)


@register_backbone("gan_encoder", "e4e_encoder")
class GANEncoder(E4EBackbone):
    """IR-SE body (or pyramid) activations of an e4e encoder.

    ``layers``: ``"body"`` (default, D11), ``"fpn"`` or a list of names; ``checkpoint``: an e4e/pSp
    ``.pt`` container (its ``opts`` give the architecture); ``arch``: keys of
    :data:`backbones._e4e_common.E4E_ARCH` for what the file does not store (tests: a tiny net).

    Example:
        >>> import bench
        >>> bb = bench.create_backbone("gan_encoder", pretrained=False, device="meta")
        >>> bb.feature_info[0], bb.feature_info[-1]
        (FeatureInfo(name='body.0', channels=64, stride=2), FeatureInfo(name='body.23', channels=512, stride=16))
    """

    weights = e4e_weights("GAN Encoder", {
        "ffhq": {"ffhq_34": (53.9, 1.3), "celeba_19": (53.9, 0.8)},
        "lsun_horse": {"horse_21": (26.7, 0.7)},
    })
    tiny = {"pretrained": False, "arch": dict(TINY_ARCH)}

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu",
                 layers: str | Sequence[str] = "body", checkpoint: str | Path | None = None,
                 arch: Mapping[str, Any] | None = None) -> None:
        super().__init__(tag=tag, pretrained=pretrained, device=device)
        requested = parse_layers(layers, owner=self.name)
        self._setup(checkpoint=checkpoint, arch=arch, tag_given=tag is not None, need_decoder=False)
        units = self.arch["stage_units"]
        names = body_layers(units) if requested == ("body",) else list(requested)
        for name in names:
            if name.startswith("body.") and int(name[5:]) >= sum(units):
                raise BenchError(f"{self.name} layer {name!r} is out of range; the body has units "
                                 f"body.0..body.{sum(units) - 1}")
        self.layers = tuple(names)

    @property
    def input_size(self) -> int:
        """The encoder's input size (256 for e4e); other images are resized to it."""
        return self.encoder_size

    def _channels_stride(self, name: str) -> tuple[int, int]:
        units, chans = self.arch["stage_units"], self.arch["stage_channels"]
        if name == "input_layer":
            return chans[0], 1
        if name in FPN_MAPS:
            return chans[_FPN_STAGE[name]], _FPN_STRIDES[name]
        index, stage = int(name[5:]), 0
        while index >= sum(units[: stage + 1]):
            stage += 1
        return chans[stage], 2 ** (stage + 1)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return [FeatureInfo(name, *self._channels_stride(name)) for name in self.layers]

    def forward_features(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """[-1, 1] input at ``input_size`` -> the chosen maps, in ``layers`` order.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("gan_encoder", **GANEncoder.tiny, layers=["body.3", "p1"])
            >>> [tuple(m.shape) for m in bb.forward_features(torch.zeros(1, 3, 32, 32))]
            [(1, 32, 2, 2), (1, 32, 8, 8)]
        """
        import torch

        x = self._encoder_input(x)
        with torch.no_grad():
            out = self.encoder(x, fpn=any(n in ("p2", "p1") for n in self.layers), heads=False)
        return [out["body"][int(n[5:])] if n.startswith("body.") else out[n] for n in self.layers]

    def config(self) -> dict[str, Any]:
        """Base config plus the architecture and the hooked maps.

        Example:
            >>> import bench
            >>> bench.create_backbone("gan_encoder", pretrained=False, device="meta", layers="fpn").config()["layers"]
            ['c1', 'c2', 'c3', 'p2', 'p1']
        """
        cfg = super().config()
        cfg["layers"] = list(self.layers)
        return cfg
