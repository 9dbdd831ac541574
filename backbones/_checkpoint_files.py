"""Checkpoint files of the ImageNet-style plugins: which file to load, and loading it safely.

The user's ``checkpoint``, else the tag's verified download; read without executing code,
converted to the model's key layout (prefixes, dropped heads), loaded strictly. A random-init
control never loads a file. Private to ``backbones``.

Example:
    >>> strip_common_prefix({"module.a": 1}, "module.")
    {'a': 1}
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch

from bench.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from bench.contract import Backbone


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
