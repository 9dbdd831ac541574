"""Safe checkpoint loading, strict architecture checks and atomic safetensors writes.

Loading never executes code from a file: ``.safetensors`` holds raw tensors only, and everything
else goes through ``torch.load(weights_only=True)``, whose unpickler refuses any global that is not
on torch's allow-list (plus :func:`_allowed_globals`). A checkpoint that does not fit the model fails
with one message naming the first offending key and its shapes, not a stack trace from inside torch.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any, Mapping

import torch

from bench.errors import CheckpointError

#: container keys tried, in order, when a checkpoint wraps its state dict and no key is given
_CONTAINER_KEYS = ("state_dict", "model")


def _allowed_globals() -> list[Any]:
    """Extra globals ``torch.load(weights_only=True)`` may rebuild, beyond torch's own allow-list.

    ``argparse.Namespace``: the MAE checkpoints (``util/misc.save_model``) pickle their training
    arguments next to the weights. Rebuilding one only creates an empty Namespace and fills its
    ``__dict__`` with values that must themselves pass the allow-list, so no code runs. Only add
    plain-data classes whose reconstruction cannot run code.

    Example:
        >>> [f"{g.__module__}.{g.__qualname__}" for g in _allowed_globals()]
        ['argparse.Namespace']
    """
    import argparse

    return [argparse.Namespace]


def _is_flat_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_state_dict(path: str | Path, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file without executing any code from it.

    A container such as ``{"state_dict": {...}, "epoch": 3}`` is unwrapped: by ``key`` when given,
    else by trying ``"state_dict"`` then ``"model"``.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "ck.pt"
        >>> torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, p)
        >>> load_state_dict(p)
        {'w': tensor([1., 1.])}
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    obj = _torch_load_weights_only(path)
    return _unwrap(obj, path, key)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as err:  # SafetensorError, OSError: a truncated or foreign file
        raise CheckpointError(f"cannot read safetensors checkpoint {path}: truncated or corrupt ({err})") from err


def _torch_load_weights_only(path: Path) -> Any:
    import pickle

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text or "WeightsUnpickler" in text:
            raise CheckpointError(
                f"checkpoint {path} was refused: it contains {_refused_what(text)}, which safe loading "
                f"(torch.load weights_only=True) does not allow; nothing from the file was executed"
            ) from err
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt ({text})") from err
    except Exception as err:  # zip reader errors, EOFError, KeyError from a foreign byte stream
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt ({err!r})") from err


def _refused_what(message: str) -> str:
    """The refused global (e.g. ``argparse.Namespace``) out of torch's long weights_only message."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", message) or re.search(r"GLOBAL (\S+)", message)
    if found:
        return f"the Python global {found.group(1)}"
    detail = message.split("WeightsUnpickler error:", 1)[-1].strip().split("\n\n")[0].strip()
    return f"pickle data it cannot check ({detail})" if detail else "pickle data it cannot check"


def _unwrap(obj: Any, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors")
    if _is_flat_tensor_dict(obj):
        return dict(obj)
    top_level = ", ".join(repr(k) for k in list(obj)[:20]) or "none"
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"checkpoint {path} has no entry {key!r}; top-level keys: {top_level}")
        if not _is_flat_tensor_dict(obj[key]):
            raise CheckpointError(f"entry {key!r} of checkpoint {path} is not a dict of tensors")
        return dict(obj[key])
    for candidate in _CONTAINER_KEYS:
        if candidate in obj and _is_flat_tensor_dict(obj[candidate]):
            return dict(obj[candidate])
    raise CheckpointError(
        f"checkpoint {path} is not a flat dict of tensors and has no 'state_dict' or 'model' entry "
        f"holding one; top-level keys: {top_level}; pass key=... to pick the entry"
    )


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` (e.g. ``"module."`` from DataParallel) from the keys that have it.

    Example:
        >>> strip_prefix({"module.w": 1, "head.b": 2}, "module.")
        {'w': 1, 'head.b': 2}
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        new = k[len(prefix):] if prefix and k.startswith(prefix) else k
        if new in out:
            raise CheckpointError(f"stripping {prefix!r} makes key {new!r} appear twice in the checkpoint")
        out[new] = v
    return out


def _expected_shapes(expected: Mapping[str, tuple[int, ...]] | torch.nn.Module) -> dict[str, tuple[int, ...]]:
    if isinstance(expected, torch.nn.Module):
        # state_dict() lists parameters and persistent buffers in module order; meta tensors work too.
        return {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    return {k: tuple(v) for k, v in expected.items()}


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]] | torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
) -> None:
    """Raise one :class:`CheckpointError` if keys or shapes differ from what the model expects.

    The message names the first missing key (in model order), else the first unexpected key, else
    the first shape mismatch, with counts of all three and the ``source`` file.

    Example:
        >>> import torch
        >>> check_state_dict({"w": (2, 3)}, {"w": torch.zeros(2, 3)}, source="ok.pt")
        >>> check_state_dict({"w": (2, 3)}, {"w": torch.zeros(3, 2)}, source="bad.pt")
        Traceback (most recent call last):
        bench.errors.CheckpointError: checkpoint bad.pt does not fit the model: key 'w' has shape (3, 2), expected (2, 3) (0 missing, 0 unexpected, 1 wrong shape)
    """
    shapes = _expected_shapes(expected)
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in shapes]
    wrong = [k for k in shapes if k in state_dict and tuple(state_dict[k].shape) != shapes[k]]
    if not (missing or unexpected or wrong):
        return
    counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shape"
    if missing:
        first = missing[0]
        what = f"missing key {first!r} (expected shape {shapes[first]})"
    elif unexpected:
        first = unexpected[0]
        what = f"unexpected key {first!r} (shape {tuple(state_dict[first].shape)})"
    else:
        first = wrong[0]
        what = f"key {first!r} has shape {tuple(state_dict[first].shape)}, expected {shapes[first]}"
    hint = _prefix_hint(missing, unexpected)
    raise CheckpointError(f"checkpoint {source} does not fit the model: {what} ({counts}){hint}")


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Point out the usual cause of a total mismatch: a key prefix such as ``module.``."""
    if not missing or not unexpected:
        return ""
    first = missing[0]
    for k in unexpected:
        if k.endswith("." + first):
            return f"; checkpoint keys seem to carry the prefix {k[: -len(first)]!r}: use strip_prefix"
    return ""


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Check ``state_dict`` against ``module``, then load it (every key, every shape).

    Checkpoint tensors are cast to the dtype of the module's tensors (fp16 checkpoints into an fp32
    model). A module built on the meta device gets the checkpoint tensors assigned (materialised on
    CPU) instead of copied.

    Example:
        >>> import torch
        >>> with torch.device("meta"):
        ...     layer = torch.nn.Linear(2, 1)
        >>> load_strict(layer, {"weight": torch.ones(1, 2, dtype=torch.float16), "bias": torch.zeros(1)}, source="x")
        >>> layer.weight.dtype, layer.weight.device.type
        (torch.float32, 'cpu')
    """
    check_state_dict(module, state_dict, source=source)
    targets = module.state_dict()
    on_meta = any(t.is_meta for t in targets.values())
    converted: dict[str, torch.Tensor] = {}
    for k, target in targets.items():
        tensor = state_dict[k]
        if target.is_meta:
            converted[k] = tensor.to(dtype=target.dtype)
        else:
            # With assign=True the checkpoint tensor replaces the module's, so it must also move.
            converted[k] = tensor.to(device=target.device, dtype=target.dtype)
    try:
        module.load_state_dict(converted, strict=True, assign=on_meta)
    except (RuntimeError, ValueError) as err:  # after the check above: a module's custom loader
        raise CheckpointError(f"loading checkpoint {source} failed: {err}") from err


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write tensors to ``path`` atomically (temp file in the same folder, then ``os.replace``).

    Tensors are made contiguous and moved to CPU; tensors sharing memory (tied weights) are cloned,
    since safetensors stores each tensor on its own. Returns ``path``.

    Example:
        >>> import tempfile, torch
        >>> p = save_safetensors({"w": torch.ones(2, 2).t()}, Path(tempfile.mkdtemp()) / "w.safetensors")
        >>> load_state_dict(p)["w"].shape
        torch.Size([2, 2])
    """
    import safetensors.torch

    path = Path(path)
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise CheckpointError(f"safetensors metadata must map str to str; got {k!r}: {v!r} for {path}")
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple[str, int]] = set()
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"cannot save {k!r} to {path}: it is a {type(v).__name__}, not a tensor")
        t = v.detach().cpu().contiguous()
        storage = (str(t.device), t.untyped_storage().data_ptr())
        if storage in seen_storage:
            t = t.clone()
        seen_storage.add((str(t.device), t.untyped_storage().data_ptr()))
        tensors[k] = t

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta or None)
        with open(tmp, "rb+") as f:  # flush to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
