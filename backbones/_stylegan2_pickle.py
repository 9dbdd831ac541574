"""Read stylegan2-ada-pytorch network pickles as data, never as code (spec section 2.1).

A training-loop snapshot is a plain pickle of ``dict(training_set_kwargs, G, D, G_ema, augment_pipe)``.
Each network object pickles as ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = {type: 'class', version: 6, module_src, class_name, state}``; the official loader imports
``dnnlib``/``torch_utils`` and *executes* ``module_src``. Here the pickle goes through
:class:`bench.safe_pickle.RestrictedUnpickler` with only these globals:

| global | becomes |
|---|---|
| ``torch_utils.persistence._reconstruct_persistent_obj`` | an inert :class:`PersistentRecord` (class name, sha256 of ``module_src``, state); ``module_src`` is never compiled |
| ``dnnlib.util.EasyDict`` | ``dict`` |
| ``collections.OrderedDict``, ``builtins.set`` | the real ones |
| ``numpy.dtype``, ``numpy(._)core.multiarray.scalar`` | an inert stub and a decoder of the scalar's bytes to a Python number (NumPy is not imported) |
| ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` | the checked wrappers of :mod:`bench.safe_pickle` |
| ``torch.storage._load_from_bytes`` | :func:`bench.safe_pickle.load_from_bytes` (the nested ``torch.save`` payload is checked too) |

The state dict is rebuilt by walking a record: its non-None ``_parameters``, then its non-None
``_buffers`` not listed in ``_non_persistent_buffers_set``, then its ``_modules`` recursively with
``name.`` prefixes, which is exactly the order of ``G_ema.state_dict()``. TensorFlow-era pickles
(``dnnlib.tflib``) are refused with a pointer to the official converter.

Example:
    >>> import collections, io, torch
    >>> rec = PersistentRecord("FullyConnectedLayer", "", {"_parameters": collections.OrderedDict(w=torch.ones(1)),
    ...     "_buffers": {}, "_modules": {}}, 6)
    >>> record_state_dict(PersistentRecord("Net", "", {"_parameters": {}, "_buffers": {}, "_modules": {"fc": rec}}, 6))
    {'fc.w': tensor([1.])}
"""
from __future__ import annotations

import collections
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from bench.errors import CheckpointError
from bench.safe_pickle import RestrictedUnpickler, load_from_bytes, make_stub, tensor_globals

__all__ = ["PersistentRecord", "load_snapshot", "load_network_record", "record_state_dict", "record_init_kwargs",
           "snapshot_globals"]

#: the official Generator's positional parameters, to name ``_init_args``
_GENERATOR_ARGS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs")
_PERSISTENCE_VERSION = 6
_TF_MESSAGE = ("{source} is a TensorFlow-era StyleGAN2 pickle (dnnlib.tflib), which cannot be read safely here; "
               "convert it first with the official stylegan2-ada-pytorch script (python legacy.py "
               "--source=<tf.pkl> --dest=<pytorch.pkl>) and pass the converted file")


@dataclass(frozen=True)
class PersistentRecord:
    """What a ``torch_utils.persistence`` object becomes: data only (its class is never rebuilt)."""

    class_name: str
    module_src_sha256: str
    state: Mapping[str, Any]
    version: int

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name!r}, module_src sha256 {self.module_src_sha256[:12]}...)"


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise CheckpointError("a torch_utils.persistence record is not of type 'class'")
    if meta.get("version") != _PERSISTENCE_VERSION:
        raise CheckpointError(f"torch_utils.persistence record version {meta.get('version')!r} is not supported "
                              f"(expected {_PERSISTENCE_VERSION})")
    src, name, state = meta.get("module_src"), meta.get("class_name"), meta.get("state")
    if not isinstance(src, str) or not isinstance(name, str) or not isinstance(state, dict):
        raise CheckpointError("a torch_utils.persistence record lacks module_src, class_name or state")
    # module_src is only hashed (to identify the code that wrote the file), never compiled
    return PersistentRecord(name, hashlib.sha256(src.encode("utf-8")).hexdigest(), state, meta["version"])


_NumpyDtype = make_stub("numpy", "dtype")
_STRUCT_CODES = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
                 "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """A NumPy scalar (``act_gain``, ...) as the Python number it holds; other kinds stay inert."""
    code = dtype.args[0] if isinstance(dtype, _NumpyDtype) and dtype.args else None
    state = dtype.state if isinstance(dtype, _NumpyDtype) else None
    order = state[1] if isinstance(state, tuple) and len(state) > 1 and state[1] in "<>" else "<"
    if isinstance(code, str) and code in _STRUCT_CODES and isinstance(data, bytes):
        fmt = order + _STRUCT_CODES[code]
        if struct.calcsize(fmt) == len(data):
            return struct.unpack(fmt, data)[0]
    return make_stub("numpy", "generic")(code, data)


def snapshot_globals() -> dict[tuple[str, str], Any]:
    """The allow-list for snapshot pickles (the table in the module docstring).

    Example:
        >>> sorted(m for m, _ in snapshot_globals())[:3]
        ['builtins', 'collections', 'dnnlib.util']
    """
    torch_table = tensor_globals()
    return {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("dnnlib.util", "EasyDict"): dict,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("numpy", "dtype"): _NumpyDtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("torch._utils", "_rebuild_tensor_v2"): torch_table[("torch._utils", "_rebuild_tensor_v2")],
        ("torch._utils", "_rebuild_parameter"): torch_table[("torch._utils", "_rebuild_parameter")],
        ("torch.storage", "_load_from_bytes"): load_from_bytes,
    }


class _SnapshotUnpickler(RestrictedUnpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "dnnlib.tflib" or module.startswith("dnnlib.tflib."):
            raise CheckpointError(_TF_MESSAGE.format(source=self._source))
        return super().find_class(module, name)


def load_snapshot(path: str | Path) -> Any:
    """The top-level object of a network pickle (a dict of records), read as data.

    Example:
        >>> load_snapshot("missing.pkl")
        Traceback (most recent call last):
        bench.errors.CheckpointError: StyleGAN2 pickle not found: missing.pkl
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"StyleGAN2 pickle not found: {path}")
    with open(path, "rb") as f:
        return _SnapshotUnpickler(f, allowed=snapshot_globals(), source=str(path)).load()


def load_network_record(path: str | Path, key: str = "G_ema") -> PersistentRecord:
    """The record of network ``key`` (``G_ema``: the generator to use; ``G`` is the non-averaged one)."""
    snapshot = load_snapshot(path)
    if not isinstance(snapshot, dict):
        raise CheckpointError(f"StyleGAN2 pickle {path} holds a {type(snapshot).__name__}, not a dict of networks")
    if key not in snapshot:
        raise CheckpointError(f"StyleGAN2 pickle {path} has no {key!r}; top-level keys: "
                              f"{', '.join(map(repr, list(snapshot)[:10]))}")
    record = snapshot[key]
    if not isinstance(record, PersistentRecord):
        raise CheckpointError(f"entry {key!r} of StyleGAN2 pickle {path} is a {type(record).__name__}, not a network")
    return record


def _entries(state: Mapping[str, Any], field: str) -> list[tuple[str, Any]]:
    value = state.get(field, {})
    if not isinstance(value, dict):
        raise CheckpointError(f"persistent record field {field!r} is a {type(value).__name__}, not a dict")
    return list(value.items())


def record_state_dict(record: PersistentRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict()`` the official object would give: keys, order and tensors (see module docstring)."""
    out: dict[str, torch.Tensor] = {}
    skip = record.state.get("_non_persistent_buffers_set") or set()
    for field in ("_parameters", "_buffers"):
        for name, tensor in _entries(record.state, field):
            if tensor is None or (field == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{prefix}{name} is a {type(tensor).__name__}, not a tensor")
            out[prefix + name] = tensor.detach()  # a Parameter becomes a plain tensor (same storage)
    for name, child in _entries(record.state, "_modules"):
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise CheckpointError(f"module {prefix}{name} is a {type(child).__name__}, not a persistent record")
        out.update(record_state_dict(child, f"{prefix}{name}."))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def record_init_kwargs(record: PersistentRecord, *, source: str = "") -> dict[str, Any]:
    """The ``Generator`` constructor arguments stored in the record (``_init_args`` named, then ``_init_kwargs``).

    Example:
        >>> record_init_kwargs(PersistentRecord("Generator", "", {"_init_args": (64,), "_init_kwargs": {"c_dim": 0}}, 6))
        {'z_dim': 64, 'c_dim': 0}
    """
    if record.class_name != "Generator":
        raise CheckpointError(f"StyleGAN2 pickle {source}: the network is a {record.class_name!r}, not a 'Generator'")
    args, kwargs = record.state.get("_init_args", ()), record.state.get("_init_kwargs", {})
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict) or len(args) > len(_GENERATOR_ARGS):
        raise CheckpointError(f"StyleGAN2 pickle {source}: malformed _init_args/_init_kwargs")
    out = dict(zip(_GENERATOR_ARGS, args))
    for k, v in kwargs.items():
        if k in out:
            raise CheckpointError(f"StyleGAN2 pickle {source}: Generator argument {k!r} given twice")
        out[k] = _plain(v)
    return out
