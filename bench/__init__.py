"""bench: a benchmark harness for label-efficient semantic segmentation from frozen backbones.

Example:
    >>> import bench
    >>> "pixels" in bench.list_backbones()
    True
"""
from __future__ import annotations

import importlib
from typing import Any

from bench.contract import Backbone, FeatureInfo, Weights
from bench.errors import BenchError
from bench.registry import create_backbone, get_backbone_class, list_backbones, register_backbone

__version__ = "0.1.0"
__all__ = [
    "Backbone", "FeatureInfo", "Weights", "BenchError",
    "create_backbone", "get_backbone_class", "list_backbones", "register_backbone",
]

# Sub-modules that pull in torch/numpy load on first attribute access (``bench.probe``), so that
# ``import bench`` and ``bench ls`` stay fast.
_LAZY = {"probe", "metrics", "features", "data", "runner", "report", "results", "hub", "checkpoints", "demo",
         "cards", "samples", "splits", "images", "labels", "seeding", "fingerprint", "progress", "parallel",
         "safe_pickle", "archives"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"bench.{name}")
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
