"""Read pickles and ``torch.save`` files without executing code from them.

Python's pickle can call any importable function while loading (``os.system``, ``builtins.eval``, a
class whose constructor runs code). This module only lets a file reach the Python objects of an
explicit allow-list, and refuses everything else with a one-line :class:`~bench.errors.CheckpointError`
naming the refused global and the file. Used for containers that ``torch.load(weights_only=True)``
cannot read: StyleGAN2-ADA network pickles (module objects with their own source) and ALAE
checkpoints (tracker objects next to the weights).

Public API:

- :class:`RestrictedUnpickler` and :func:`load_pickle`: a pickle reader whose every global (GLOBAL,
  STACK_GLOBAL, INST, OBJ, NEWOBJ, extension codes) resolves through ``allowed``; persistent ids are
  refused unless a ``persistent_load`` is given; BUILD (``__setstate__``) is refused on anything but
  instances of allowed classes and :class:`Stub` objects, so a file cannot rewrite an allowed
  function's or class's attributes.
- :func:`load_torch_file`: a ``torch.save`` container (zip format and the legacy pre-1.6 format) read
  with that unpickler: only the globals needed to rebuild tensors, plus ``extra_allowed``; storages
  are read from the container's records as raw bytes.
- :func:`tensor_globals` (the allow-list :func:`load_torch_file` uses, to build others on it) and
  :func:`load_from_bytes` (a safe stand-in for ``torch.storage._load_from_bytes``, whose stock version
  runs a full unpickler on the nested payload).
- :class:`Stub` / :func:`make_stub`: inert stand-ins for allowed-but-unneeded classes (trackers,
  optimiser objects): instances only record their arguments and state; no code of the original runs.

Decision: the reader is built on the pure-Python ``pickle._Unpickler`` (not the C ``pickle.Unpickler``)
because only there can BUILD be guarded; our files hold few, large objects, so speed is the same.

Example:
    >>> import io, pickle, collections
    >>> data = pickle.dumps(collections.OrderedDict(a=1))
    >>> dict(RestrictedUnpickler(io.BytesIO(data), allowed={("collections", "OrderedDict"): collections.OrderedDict}).load())
    {'a': 1}
    >>> RestrictedUnpickler(io.BytesIO(data), allowed={}, source="x.pkl").load()
    Traceback (most recent call last):
    bench.errors.CheckpointError: x.pkl refers to the Python global collections.OrderedDict, which is not on the allow-list; nothing from the file was executed
"""
from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

from bench.errors import CheckpointError

__all__ = ["RestrictedUnpickler", "load_pickle", "load_torch_file", "load_from_bytes", "tensor_globals",
           "Stub", "make_stub"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-zip torch.save file
_LEGACY_PROTOCOL = 1001


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class Stub:
    """An inert placeholder for an allowed class whose behaviour is not needed.

    Constructing one (REDUCE, NEWOBJ, INST, OBJ) only stores ``args``/``kwargs``; ``__setstate__``
    only stores ``state``. Make one per refused class with :func:`make_stub`.

    Example:
        >>> Tracker = make_stub("tracker", "RunningMean")
        >>> t = Tracker.__new__(Tracker, 3); t.__setstate__({"values": [1.0]})
        >>> t.args, t.state, Tracker.__module__
        ((3,), {'values': [1.0]}, 'tracker')
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "Stub":
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # arguments already kept by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub {type(self).__module__}.{type(self).__qualname__} args={self.args!r}>"


def make_stub(module: str, name: str) -> type[Stub]:
    """A new :class:`Stub` subclass standing for the global ``module.name``.

    Example:
        >>> make_stub("tracker", "RunningMeanTorch")()
        <stub tracker.RunningMeanTorch args=()>
    """
    return type(name, (Stub,), {"__module__": module, "__qualname__": name})


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]  # pure Python: BUILD can be guarded
    """A pickle reader that only reaches the objects in ``allowed``.

    ``allowed`` maps ``(module, name)`` to the object returned for that global (the real one, a
    wrapper, or a :func:`make_stub` class). Anything else raises :class:`CheckpointError` naming the
    global and ``source``. Persistent ids raise unless ``persistent_load`` is given.

    Example:
        >>> import io, pickle
        >>> RestrictedUnpickler(io.BytesIO(pickle.dumps({"a": [1, 2.0]})), allowed={}).load()
        {'a': [1, 2.0]}
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: Any, *, allowed: Mapping[tuple[str, str], Any],
                 persistent_load: Callable[[Any], Any] | None = None, source: str = "") -> None:
        super().__init__(file)
        self._allowed = dict(allowed)
        self._persistent = persistent_load
        self._source = source or "pickle data"
        # instances of these may receive BUILD state; the globals themselves never do
        self._buildable = tuple(v for v in self._allowed.values() if isinstance(v, type)) + (Stub,)
        self._global_ids = {id(v) for v in self._allowed.values()}

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names (protocols 0-2), as pickle does
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise CheckpointError(
                f"{self._source} refers to the Python global {_one_line(f'{module}.{name}')}, which is not on the "
                f"allow-list; nothing from the file was executed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise CheckpointError(f"{self._source} holds a persistent id ({_one_line(repr(pid))[:80]}), which this "
                                  f"format does not allow; nothing from the file was executed")
        return self._persistent(pid)

    def _load_build_guarded(self) -> None:
        if len(self.stack) < 2:
            raise CheckpointError(f"cannot read {self._source}: BUILD without an object")
        inst = self.stack[-2]  # the top of the stack is the state
        if id(inst) in self._global_ids or isinstance(inst, type) or not isinstance(inst, self._buildable):
            raise CheckpointError(f"{self._source} sets the state of a {type(inst).__name__} object, which is not "
                                  f"allowed; nothing from the file was executed")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _load_build_guarded

    def load(self) -> Any:
        """Unpickle one object; every failure is a one-line :class:`CheckpointError`."""
        try:
            return super().load()
        except CheckpointError:
            raise
        except RecursionError:
            raise CheckpointError(f"cannot read {self._source}: nested too deeply") from None
        except Exception as err:  # UnpicklingError, EOFError, a wrong call to an allowed function, ...
            raise CheckpointError(f"cannot read {self._source}: truncated, corrupt or not the expected format "
                                  f"({type(err).__name__}: {_one_line(err)[:200]})") from err


def load_pickle(path: str | Path, *, allowed: Mapping[tuple[str, str], Any],
                persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle the file at ``path`` with :class:`RestrictedUnpickler`.

    Example:
        >>> import pickle, tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x.pkl"; _ = p.write_bytes(pickle.dumps([1, "a"]))
        >>> load_pickle(p, allowed={})
        [1, 'a']
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, allowed=allowed, persistent_load=persistent_load, source=str(path)).load()


# ---- torch.save containers ------------------------------------------------------------------------------

class _StorageType:
    """What ``torch.FloatStorage`` & co. resolve to: only a dtype, never the real (allocating) class."""

    def __init__(self, name: str, dtype: Any) -> None:
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"<storage type torch.{self.name}>"


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # protocol-2 pickles (torch.save's default) write bytes as _codecs.encode(str, 'latin1')
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise CheckpointError(f"pickle data calls _codecs.encode with encoding {encoding!r}; only latin1 is allowed")
    return text.encode("latin1")


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                       metadata: Any = None) -> Any:
    import torch

    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError(f"tensor data is a {type(storage).__name__}, not a storage")
    if hooks:  # hooks would be called later, during a backward pass
        raise CheckpointError("a tensor in the file carries backward hooks, which are not allowed")
    args = (storage, offset, size, stride, requires_grad, collections.OrderedDict())
    return torch._utils._rebuild_tensor_v2(*args, *(() if metadata is None else (metadata,)))


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any) -> Any:
    import torch

    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"parameter data is a {type(data).__name__}, not a tensor")
    if hooks:
        raise CheckpointError("a parameter in the file carries backward hooks, which are not allowed")
    return torch._utils._rebuild_parameter(data, requires_grad, collections.OrderedDict())


def tensor_globals() -> dict[tuple[str, str], Any]:
    """The allow-list of :func:`load_torch_file`: what ``torch.save`` needs to rebuild tensors.

    Plain containers (``OrderedDict``, ``set``, ``frozenset``, ``bytearray``, ``complex``, latin1
    ``_codecs.encode``), ``torch.Size``, ``torch.device``, the dtypes, the storage types (as inert
    markers) and checked wrappers of ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``.

    Example:
        >>> ("torch._utils", "_rebuild_tensor_v2") in tensor_globals()
        True
    """
    return dict(_tensor_globals())


@functools.lru_cache(maxsize=1)
def _tensor_globals() -> dict[tuple[str, str], Any]:  # built once: scanning dir(torch) is slow
    import torch

    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray, ("builtins", "complex"): complex,
        ("_codecs", "encode"): _latin1_encode,
        ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch", "UntypedStorage"): _StorageType("UntypedStorage", torch.uint8),
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", torch.uint8),
    }
    for name, obj in list(vars(torch).items()):  # vars: no lazy submodule imports, unlike getattr
        if isinstance(obj, torch.dtype):
            table[("torch", name)] = obj
        elif name.endswith("Storage") and isinstance(obj, type) and issubclass(obj, torch.storage.TypedStorage):
            with warnings.catch_warnings():  # the legacy classes warn that TypedStorage is deprecated
                warnings.simplefilter("ignore")
                dtype = getattr(obj, "dtype", None)
            if isinstance(dtype, torch.dtype):
                table[("torch", name)] = _StorageType(name, dtype)
    return table


def _storage_from_buffer(buffer: bytearray, dtype: Any, big_endian: bool = False) -> Any:
    import torch

    untyped = (torch.frombuffer(buffer, dtype=torch.uint8) if len(buffer) else torch.empty(0, dtype=torch.uint8))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if big_endian and itemsize > 1:
        untyped = untyped.view(-1, itemsize).flip(-1).reshape(-1).clone()
    return torch.storage.TypedStorage(wrap_storage=untyped.untyped_storage(), dtype=dtype, _internal=True)


def _parse_storage_pid(pid: Any, source: str) -> tuple[str, Any, int]:
    """(key, dtype, numel) of a ``('storage', type, key, location, numel[, view])`` persistent id."""
    ok = (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], _StorageType)
          and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0)
    if not ok:
        raise CheckpointError(f"{source} holds an unexpected persistent id {_one_line(repr(pid))[:80]}; "
                              f"only tensor storages are allowed")
    if len(pid) == 6 and pid[5] is not None:  # storage views: written by torch < 1.0 only
        raise CheckpointError(f"{source} uses storage views (torch < 1.0 format), which are not supported")
    return pid[2], pid[1].dtype, pid[4]


def _itemsize(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def load_torch_file(path_or_bytes: str | Path | bytes | bytearray | memoryview, *,
                    extra_allowed: Mapping[tuple[str, str], Any] = {}) -> Any:
    """Read a ``torch.save`` file (zip or legacy format) without executing code from it.

    Only :func:`tensor_globals` and ``extra_allowed`` are reachable; tensors come back on the CPU.

    Example:
        >>> import torch
        >>> buf = io.BytesIO(); torch.save({"w": torch.arange(3.0)}, buf)
        >>> load_torch_file(buf.getvalue())
        {'w': tensor([0., 1., 2.])}
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, source = bytes(path_or_bytes), "nested torch.save payload"
        opener: Callable[[], Any] = lambda: io.BytesIO(data)  # noqa: E731
        size = len(data)
    else:
        path = Path(path_or_bytes)
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        source, size = str(path), path.stat().st_size
        opener = lambda: open(path, "rb")  # noqa: E731
    allowed = {**tensor_globals(), **extra_allowed}
    with opener() as f:
        if f.read(4) == b"PK\x03\x04":
            f.seek(0)
            return _load_zip(f, allowed, source)
        f.seek(0)
        return _load_legacy(f, allowed, source, size)


def _load_zip(f: Any, allowed: Mapping[tuple[str, str], Any], source: str) -> Any:
    try:
        archive = zipfile.ZipFile(f)
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {source}: not a valid torch zip file ({_one_line(err)})") from err
    pickles = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if len(pickles) != 1:
        raise CheckpointError(f"cannot read {source}: expected one data.pkl record, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in names:
        big_endian = archive.read(prefix + "byteorder").strip() == b"big"
    storages: dict[str, tuple[Any, Any, int]] = {}

    def persistent_load(pid: Any) -> Any:
        key, dtype, numel = _parse_storage_pid(pid, source)
        if key in storages:
            storage, seen_dtype, seen_numel = storages[key]
            if (seen_dtype, seen_numel) != (dtype, numel):
                raise CheckpointError(f"{source}: storage {key!r} is referenced with two different types or sizes")
            return storage
        record = f"{prefix}data/{key}"
        try:
            info = archive.getinfo(record)
        except KeyError:
            raise CheckpointError(f"cannot read {source}: record {record!r} is missing") from None
        nbytes = numel * _itemsize(dtype)
        if info.file_size != nbytes:  # also stops a compressed record from inflating beyond the tensor
            raise CheckpointError(f"cannot read {source}: record {record!r} holds {info.file_size} bytes, "
                                  f"expected {nbytes}")
        buffer = bytearray(nbytes)
        with archive.open(info) as rec:
            if rec.readinto(buffer) != nbytes:
                raise CheckpointError(f"cannot read {source}: record {record!r} is truncated")
        storage = _storage_from_buffer(buffer, dtype, big_endian)
        storages[key] = (storage, dtype, numel)
        return storage

    with archive.open(pickles[0]) as pkl:
        return RestrictedUnpickler(io.BytesIO(pkl.read()), allowed=allowed, persistent_load=persistent_load,
                                   source=source).load()


def _load_legacy(f: Any, allowed: Mapping[tuple[str, str], Any], source: str, size: int) -> Any:
    def plain() -> Any:  # the header pickles and the key list need no globals at all
        return RestrictedUnpickler(f, allowed={}, source=source).load()

    if plain() != _LEGACY_MAGIC:
        raise CheckpointError(f"cannot read {source}: not a torch.save file (no zip header, no legacy magic number)")
    if plain() != _LEGACY_PROTOCOL:
        raise CheckpointError(f"cannot read {source}: unsupported legacy torch.save protocol version")
    sys_info = plain()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise CheckpointError(f"cannot read {source}: only little-endian legacy torch.save files are supported")
    buffers: dict[str, tuple[bytearray, Any, int, Any]] = {}

    def persistent_load(pid: Any) -> Any:
        key, dtype, numel = _parse_storage_pid(pid, source)
        if key not in buffers:
            nbytes = numel * _itemsize(dtype)
            if nbytes > size:  # a lying header cannot make us allocate more than the file holds
                raise CheckpointError(f"cannot read {source}: storage {key!r} claims {nbytes} bytes, more than the file")
            buffer = bytearray(nbytes)  # filled below, after the object pickle; tensors share this memory
            buffers[key] = (buffer, dtype, numel, _storage_from_buffer(buffer, dtype))
        _, seen_dtype, seen_numel, storage = buffers[key]
        if (seen_dtype, seen_numel) != (dtype, numel):
            raise CheckpointError(f"{source}: storage {key!r} is referenced with two different types or sizes")
        return storage

    obj = RestrictedUnpickler(f, allowed=allowed, persistent_load=persistent_load, source=source).load()
    keys = plain()
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(buffers) or len(set(keys)) != len(keys):
        raise CheckpointError(f"cannot read {source}: the storage list does not match the tensors")
    for key in keys:
        buffer, dtype, numel, _ = buffers[key]
        header = f.read(8)
        if len(header) != 8 or int.from_bytes(header, "little") != numel:
            raise CheckpointError(f"cannot read {source}: storage {key!r} has a wrong size header or is truncated")
        if f.readinto(memoryview(buffer)) != len(buffer):
            raise CheckpointError(f"cannot read {source}: storage {key!r} is truncated")
    return obj


def load_from_bytes(data: bytes) -> Any:
    """Safe replacement for ``torch.storage._load_from_bytes``: the nested payload is itself a
    ``torch.save`` file (a storage), read with :func:`load_torch_file` (so its pickle is checked too).

    Example:
        >>> import torch
        >>> buf = io.BytesIO(); torch.save(torch.ones(2), buf, _use_new_zipfile_serialization=False)
        >>> load_from_bytes(buf.getvalue())
        tensor([1., 1.])
    """
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError(f"storage payload is a {type(data).__name__}, not bytes")
    return load_torch_file(bytes(data))
