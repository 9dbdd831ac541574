"""``bench check``: the plugin contract, runnable by a contributor on one backbone.

The same checks drive the registry-wide contract test (``tests/test_contract.py``), so a new
backbone file is covered as soon as it is registered.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from bench.contract import Backbone, FeatureInfo, Weights
from bench.errors import BenchError
from bench.registry import get_backbone_class


def _fail(name: str, what: str) -> BenchError:
    return BenchError(f"backbone {name!r} breaks the contract: {what}")


def check_declarations(cls: type[Backbone]) -> None:
    """Class-level declarations: weights table entries, default tag, paper numbers.

    Example:
        >>> check_declarations(get_backbone_class("pixels"))
    """
    for tag, w in cls.weights.items():
        if not isinstance(w, Weights) or w.tag != tag:
            raise _fail(cls.name, f"weights[{tag!r}] must be a bench.Weights with tag {tag!r}")
        if not (w.url or w.file):
            raise _fail(cls.name, f"weights[{tag!r}] has neither url nor file")
        for dataset, value in w.paper_miou.items():
            if len(tuple(value)) != 2:
                raise _fail(cls.name, f"weights[{tag!r}].paper_miou[{dataset!r}] must be (mean, std)")
    if cls.weights and cls.default_tag not in cls.weights:
        raise _fail(cls.name, f"default_tag {cls.default_tag!r} is not a key of weights")


def check_import_is_cheap(cls: type[Backbone]) -> None:
    """Importing the plugin module must not import torch (``bench ls`` stays fast).

    Example:
        >>> check_import_is_cheap(get_backbone_class("pixels"))
    """
    code = f"import sys, {cls.__module__}; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise _fail(cls.name, f"importing {cls.__module__} failed: {res.stderr.strip()[-300:]}")
    if res.stdout.strip() == "True":
        raise _fail(cls.name, f"importing {cls.__module__} imports torch; import it inside methods")


def check_instance(backbone: Backbone) -> None:
    """Runtime contract on a built (tiny) backbone: feature_info, preprocess, forward_features, config.

    Example:
        >>> import bench
        >>> check_instance(bench.create_backbone("pixels"))
    """
    import torch

    name = backbone.name
    info = list(backbone.feature_info)
    if not info or not all(isinstance(f, FeatureInfo) for f in info):
        raise _fail(name, "feature_info must be a non-empty sequence of bench.FeatureInfo")
    if len({f.name for f in info}) != len(info):
        raise _fail(name, "feature_info names must be unique")
    if any(f.channels <= 0 or f.stride <= 0 for f in info):
        raise _fail(name, "feature_info channels and stride must be positive")
    size = backbone.input_size or 32 * max(f.stride for f in info)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=gen)
    x = backbone.preprocess(images)
    if not isinstance(x, torch.Tensor) or x.shape[0] != 2:
        raise _fail(name, "preprocess must return a tensor with the batch dimension first")
    with torch.inference_mode():
        maps = backbone.forward_features(x)
        again = backbone.forward_features(backbone.preprocess(images))
    if not isinstance(maps, list) or len(maps) != len(info):
        raise _fail(name, f"forward_features returned {len(maps) if isinstance(maps, list) else type(maps)} maps, "
                          f"feature_info declares {len(info)}")
    for f, m, m2 in zip(info, maps, again):
        expected = (2, f.channels, size // f.stride, size // f.stride)
        if tuple(m.shape) != expected:
            raise _fail(name, f"map {f.name!r} has shape {tuple(m.shape)}, feature_info implies {expected}")
        if not torch.isfinite(m.float()).all():
            raise _fail(name, f"map {f.name!r} has non-finite values")
        if not torch.equal(m, m2):
            raise _fail(name, f"map {f.name!r} differs between two calls on the same images")
    if backbone.num_features != sum(f.channels for f in info):
        raise _fail(name, "num_features must equal the sum of feature_info channels")
    try:
        json.dumps(backbone.config())
    except TypeError as exc:
        raise _fail(name, f"config() must be JSON-serialisable: {exc}") from exc


def build_tiny(cls: type[Backbone], device: str = "cpu") -> Backbone:
    """The plugin's tiny random-init variant (``cls.tiny``; ``pretrained=False`` unless it says otherwise).

    Example:
        >>> build_tiny(get_backbone_class("pixels")).num_features
        5
    """
    kwargs = {"pretrained": False, **dict(cls.tiny)}
    return cls(device=device, **kwargs)


def check_backbone(name: str, *, evaluate: bool = True, out: Path | None = None) -> Iterator[str]:
    """Run every contract check on ``name`` and, if ``evaluate``, a 4-image demo evaluation.

    Yields one line per passed step; raises :class:`BenchError` on the first failure.

    Example:
        >>> lines = list(check_backbone("pixels", evaluate=False))
        >>> lines[-1]
        'contract: OK'
    """
    cls = get_backbone_class(name)
    check_declarations(cls)
    yield f"declarations: {len(cls.weights)} weights tag(s)"
    check_import_is_cheap(cls)
    yield f"import: {cls.__module__} does not import torch"
    tiny = build_tiny(cls)
    check_instance(tiny)
    yield f"tiny variant: {len(tiny.feature_info)} maps, {tiny.num_features} channels"
    yield "contract: OK"
    if evaluate:
        from bench.runner import RunSpec, run

        folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="bench-check-"))
        # Its own label: a 2-image check must never stand in for a real run's result.
        spec = RunSpec(backbone=name, dataset="demo", seed=0, pretrained=False, out=folder, name=f"{name}-check",
                       cache=folder / "features", max_train=2, max_test=2, progress=False)
        result = run(spec)
        yield (f"4-image demo evaluation (random weights, 2 train / 2 test): mIoU official "
               f"{100 * result['miou']['official']:.1f}, standard {100 * result['miou']['standard']:.1f}")
