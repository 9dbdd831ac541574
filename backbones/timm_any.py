"""``timm``: any timm model as a backbone, through timm's feature-extraction wrapper.

``--backbone timm:convnext_base`` (or ``create_backbone("timm", model="resnet18")``) builds the model
with ``features_only=True``; ``out_indices`` selects the feature stages (timm's numbering: for a ResNet
0 is the stem at stride 2 and 1..4 are layer1..layer4; for a ViT every block is a stage), and
``feature_info`` comes from timm's (channels, reduction). Inputs are scaled to [0, 1] and normalised
with the model's own mean/std from its pretrained config.

Weights: this harness downloads nothing on timm's behalf. ``pretrained=False`` gives random weights;
``pretrained=True`` needs ``checkpoint=PATH``, a local file holding the model's state dict in timm's
layout (``.safetensors``, or ``.pth``/``.bin`` read with ``weights_only``), e.g. the
``model.safetensors`` of a timm Hugging Face repository. It is checked key by key against the full
model before timm loads it.

Example:
    >>> import bench
    >>> bb = bench.create_backbone("timm:resnet18", pretrained=False, device="meta", out_indices=[1, 4])
    >>> [(f.name, f.channels, f.stride) for f in bb.feature_info]
    [('layer1', 64, 4), ('layer4', 512, 32)]
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from bench import Backbone, BenchError, FeatureInfo, register_backbone
from bench.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _timm_model_name(model: Any) -> str:
    """Check that timm knows ``model``; suggest close names when it does not."""
    import difflib

    import timm

    if not isinstance(model, str) or not model:
        raise BenchError("the timm backbone needs a model name: --backbone timm:NAME or model=NAME "
                         "(e.g. timm:resnet18, timm:convnext_base)")
    if timm.is_model(model):
        return model
    close = difflib.get_close_matches(model, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise BenchError(f"timm has no model {model!r}{hint} (timm.list_models() lists them)")


def _stage_indices(values: Any, count: int, model: str) -> tuple[int, ...]:
    """Validate ``out_indices`` against the model's ``count`` feature stages (negative = from the end)."""
    from bench.contract import validate_indices

    return tuple(sorted(validate_indices(values, limit=count, owner=f"timm {model}", what="out_indices", item="out_index",
                                         allow_negative=True)))


@register_backbone("timm")
class TimmAny(Backbone):
    """Feature stages of any timm model.

    ``model`` is the timm name (default ``resnet18``, small enough for a laptop), ``out_indices`` the stages (default: timm's default for the model),
    ``checkpoint`` a local state-dict file (required when ``pretrained``), ``image_size`` a square size
    every input is resized to (default: none, except for models whose patch embedding needs their
    configured size, e.g. ViTs, which get that size).

    Example:
        >>> import bench
        >>> bench.create_backbone("timm", model="resnet18", pretrained=False, device="meta").num_features
        1024
    """

    variant_arg = "model"
    tiny = {"pretrained": False, "model": "resnet18", "out_indices": (0, 1, 2)}

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu",
                 model: str = "resnet18", out_indices: Sequence[int] | None = None,
                 checkpoint: str | Path | None = None, image_size: int | None = None) -> None:
        super().__init__(tag=tag, pretrained=pretrained, device=device)
        import timm
        import torch

        self.model_name = _timm_model_name(model)
        if checkpoint is None and pretrained:
            raise BenchError(
                f"timm:{self.model_name} with pretrained=True needs checkpoint=PATH (bench run --weights PATH): "
                f"a local state-dict file of this model in timm's layout (.safetensors, .pth or .bin). This "
                f"harness does not download timm or Hugging Face hub weights; use pretrained=False (bench run "
                f"--pretrained false) for random weights"
            )
        with torch.device("meta"):  # the full model, free: stage count, input config, checkpoint check
            full = timm.create_model(self.model_name, pretrained=False)
        stages = getattr(full, "feature_info", None)
        if not stages:
            raise BenchError(f"timm model {self.model_name!r} declares no feature stages (feature_info); "
                             f"it cannot be used with features_only")
        self.out_indices = None if out_indices is None else _stage_indices(out_indices, len(stages), self.model_name)
        cfg = full.pretrained_cfg or {}
        self.mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
        self.image_size = self._image_size(full, cfg, image_size)

        kwargs: dict[str, Any] = {"features_only": True}
        if self.out_indices is not None:
            kwargs["out_indices"] = self.out_indices
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise CheckpointError(f"timm checkpoint file not found: {checkpoint}")
        if not pretrained:
            checkpoint = None  # a random-init control never loads weights, the user's file included
        if checkpoint is not None:
            from bench.checkpoints import check_state_dict, load_state_dict
            from bench.hub import sha256_file

            path = Path(checkpoint)
            state_dict = load_state_dict(path)
            check_state_dict(full, state_dict, source=str(path))  # our message, before timm sees the file
            # timm loads the in-memory dict into the full model (strictly), then wraps that model for
            # features; source=None keeps timm on this dict, never on a hub or url.
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict, "source": None})
            self._weights_sha256 = sha256_file(path)
        try:
            if str(device) == "meta" and checkpoint is None:
                with torch.device("meta"):
                    net = timm.create_model(self.model_name, **kwargs)
            else:
                net = timm.create_model(self.model_name, **kwargs)
        except (RuntimeError, ValueError, AssertionError, TypeError) as err:
            raise BenchError(f"timm could not build {self.model_name!r} for feature extraction "
                             f"({type(err).__name__}: {err})") from err
        self._stages = [(str(m), int(c), int(r)) for m, c, r in zip(
            net.feature_info.module_name(), net.feature_info.channels(), net.feature_info.reduction())]
        self.model = net.to(device).eval().requires_grad_(False)

    @staticmethod
    def _image_size(full: Any, cfg: dict, image_size: int | None) -> int | None:
        """The user's size; for models whose patch embedding is built for one size (ViTs), that size."""
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size <= 0):
            raise BenchError(f"timm image_size must be a positive integer, got {image_size!r}")
        patch_embed = getattr(full, "patch_embed", None)
        if patch_embed is None or not getattr(patch_embed, "strict_img_size", False):
            return image_size
        fixed = int(cfg.get("input_size", (3, 224, 224))[-1])
        if image_size not in (None, fixed):
            raise BenchError(f"timm model {cfg.get('architecture', '')!r} takes {fixed} px inputs only; "
                             f"image_size={image_size} cannot be used (inputs are resized to {fixed})")
        return fixed

    @property
    def input_size(self) -> int | None:
        """The square size inputs are resized to, or None when the model takes any size."""
        return self.image_size

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return [FeatureInfo(name=name, channels=channels, stride=reduction)
                for name, channels, reduction in self._stages]

    def preprocess(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 [B, 3, H, W] -> float32 normalised with the model's mean/std (resized if it needs a size).

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("timm", **TimmAny.tiny)
            >>> bb.preprocess(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)).shape
            torch.Size([1, 3, 16, 16])
        """
        from backbones._imagenet_features import imagenet_input

        size = None if self.image_size is None else (self.image_size, self.image_size)
        return imagenet_input(images, owner=f"timm:{self.model_name}", size=size, mean=self.mean, std=self.std,
                              device=self.device)

    def forward_features(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """Model input -> the selected stages as ``[B, C, H/r, W/r]`` maps (timm's order).

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("timm", **TimmAny.tiny)
            >>> [tuple(m.shape) for m in bb.forward_features(torch.zeros(1, 3, 32, 32))]
            [(1, 64, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4)]
        """
        import torch

        with torch.no_grad():
            maps = self.model(x.to(self.device))
        return [m.float() for m in (maps.values() if isinstance(maps, dict) else maps)]

    def config(self) -> dict[str, Any]:
        """Base config plus the timm model name, stages, image size and normalisation.

        Example:
            >>> import bench
            >>> bench.create_backbone("timm", **TimmAny.tiny).config()["model"]
            'resnet18'
        """
        cfg = super().config()
        cfg.update({"model": self.model_name, "out_indices": None if self.out_indices is None else
                    list(self.out_indices), "image_size": self.image_size, "mean": list(self.mean),
                    "std": list(self.std)})
        return cfg
