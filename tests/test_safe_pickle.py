"""bench.safe_pickle: malicious pickles are refused without running (C3); torch.save files round-trip."""
from __future__ import annotations

import collections
import io
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from bench.errors import CheckpointError
from bench.safe_pickle import (RestrictedUnpickler, Stub, load_from_bytes, load_pickle, load_torch_file,
                               make_stub, tensor_globals)
from helpers import WritesMarker

PROTOCOLS = [0, 2, 3, 4, 5]


def _text(s: str) -> bytes:
    return b"V" + s.encode("raw_unicode_escape") + b"\n"  # UNICODE opcode: readable at every protocol


def _payload(protocol: int, opcode: str, module: str, name: str, arg: str) -> bytes:
    """A handcrafted pickle calling ``module.name(arg)`` through one opcode, at one protocol."""
    head = b"" if protocol == 0 else bytes([0x80, protocol])
    glob = f"c{module}\n{name}\n".encode()
    if opcode == "GLOBAL":
        body = glob + b"(" + _text(arg) + b"tR"
    elif opcode == "STACK_GLOBAL":
        body = _text(module) + _text(name) + b"\x93(" + _text(arg) + b"tR"
    elif opcode == "INST":
        body = b"(" + _text(arg) + f"i{module}\n{name}\n".encode()
    elif opcode == "OBJ":
        body = b"(" + glob + _text(arg) + b"o"
    elif opcode == "NEWOBJ":  # cls.__new__(cls, *args): reaches a class, e.g. subprocess.Popen
        body = glob + b"(" + _text(arg) + b"t\x81"
    else:
        raise AssertionError(opcode)
    return head + body + b"."


def _targets(marker: Path) -> list[tuple[str, str, str]]:
    """Process-spawning and code-evaluating callables, each given an argument that writes ``marker``."""
    py = f"open({str(marker)!r}, 'w').write('pwned')"
    return [
        ("os", "system", f"touch {marker}"),
        ("posix", "system", f"touch {marker}"),
        ("subprocess", "getoutput", f"touch {marker}"),
        ("builtins", "eval", py),
        ("builtins", "exec", py),
    ]


def test_payloads_are_live_with_the_stock_unpickler(tmp_path):
    """Control: the handcrafted payloads really run code, so refusing them below means something."""
    for i, (module, name, arg) in enumerate(_targets(tmp_path / "control")):
        marker = tmp_path / f"control{i}"
        arg = arg.replace(str(tmp_path / "control"), str(marker))
        pickle.loads(_payload(2, "GLOBAL", module, name, arg))
        assert marker.exists(), (module, name)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("opcode", ["GLOBAL", "STACK_GLOBAL", "INST", "OBJ"])
def test_malicious_globals_are_refused(tmp_path, protocol, opcode):
    marker = tmp_path / "pwned"
    for module, name, arg in _targets(marker):
        path = tmp_path / f"{module}.{name}.pkl"
        path.write_bytes(_payload(protocol, opcode, module, name, arg))
        with pytest.raises(CheckpointError, match=rf"{path.name}.* global {module}\.{name}, which is not on"):
            load_pickle(path, allowed=tensor_globals())
        with pytest.raises(CheckpointError, match=rf"global {module}\.{name}"):
            load_torch_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2])
def test_python2_names_are_mapped_then_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    data = _payload(protocol, "GLOBAL", "__builtin__", "eval", f"open({str(marker)!r}, 'w')")
    with pytest.raises(CheckpointError, match=r"builtins\.eval"):
        RestrictedUnpickler(io.BytesIO(data), allowed={}).load()
    assert not marker.exists()


def test_newobj_and_the_real_pickle_of_a_writer_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(CheckpointError, match=r"subprocess\.Popen"):
        RestrictedUnpickler(io.BytesIO(_payload(2, "NEWOBJ", "subprocess", "Popen", f"touch {marker}")),
                            allowed={}).load()
    for protocol in PROTOCOLS:
        data = pickle.dumps({"w": [1, WritesMarker(marker)]}, protocol=protocol)
        with pytest.raises(CheckpointError, match=r"builtins\.exec"):
            RestrictedUnpickler(io.BytesIO(data), allowed={}, source="evil.pkl").load()
    assert not marker.exists()


def test_persistent_ids_are_refused_without_a_loader():
    for data in (b"Pfoo\n.", b"\x80\x02X\x03\x00\x00\x00fooQ."):
        with pytest.raises(CheckpointError, match="persistent id"):
            RestrictedUnpickler(io.BytesIO(data), allowed={}).load()
    assert RestrictedUnpickler(io.BytesIO(b"Pfoo\n."), allowed={}, persistent_load=lambda pid: pid * 2).load() == "foofoo"


def test_state_cannot_be_set_on_an_allowed_global():
    """BUILD on a global (here a function) would rewrite it for the whole process: refused."""
    def target() -> int:
        return 1
    data = b"\x80\x02cm\nf\n}" + _text("__defaults__") + b"K\x01\x85sb."
    with pytest.raises(CheckpointError, match="sets the state of a function"):
        RestrictedUnpickler(io.BytesIO(data), allowed={("m", "f"): target}).load()
    slot_state = b"\x80\x02cm\nf\nN}" + _text("__kwdefaults__") + b"}s\x86b."
    with pytest.raises(CheckpointError, match="sets the state"):
        RestrictedUnpickler(io.BytesIO(slot_state), allowed={("m", "f"): target}).load()
    assert target.__defaults__ is None and target.__kwdefaults__ is None


def test_stubs_load_trackers_without_running_them():
    class Tracker:  # stands for a checkpoint's custom class; its code must not run on load
        def __init__(self) -> None:
            self.values = [torch.ones(2)]

        def __setstate__(self, state):  # pragma: no cover - must never be called
            raise AssertionError("original class code ran")

    Tracker.__module__, Tracker.__qualname__ = "tracker", "RunningMeanTorch"
    buf = io.BytesIO()
    import sys
    import types
    fake = types.ModuleType("tracker")
    fake.RunningMeanTorch = Tracker
    sys.modules["tracker"] = fake
    try:
        torch.save({"auxiliary": {"tracker": Tracker()}, "w": torch.arange(3.0)}, buf)
    finally:
        del sys.modules["tracker"]
    stub = make_stub("tracker", "RunningMeanTorch")
    out = load_torch_file(buf.getvalue(), extra_allowed={("tracker", "RunningMeanTorch"): stub})
    obj = out["auxiliary"]["tracker"]
    assert isinstance(obj, Stub) and type(obj) is stub and torch.equal(obj.state["values"][0], torch.ones(2))
    assert torch.equal(out["w"], torch.arange(3.0))
    with pytest.raises(CheckpointError, match=r"tracker\.RunningMeanTorch"):
        load_torch_file(buf.getvalue())


# ---- torch.save round trips ----------------------------------------------------------------------------

def _container() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    base[0, 0] = float("nan")
    param = torch.nn.Parameter(torch.randn(3, 3, generator=g))
    frozen = torch.nn.Parameter(torch.randn(2, generator=g), requires_grad=False)
    return collections.OrderedDict(
        f32=base, view=base[1:, ::2], t=base.t(), f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(5, generator=g).bfloat16(), f64=torch.randn(2, 2, dtype=torch.float64, generator=g),
        i64=torch.arange(-3, 3), u8=torch.arange(250, 256, dtype=torch.uint8), b=torch.tensor([True, False]),
        c64=torch.randn(2, dtype=torch.complex64, generator=g), scalar=torch.tensor(2.5), empty=torch.zeros(0, 3),
        param=param, frozen=frozen, nested={"list": [1, 2.0, "s", None, (True, b"\x00\xff")], "set": {1, 2},
                                            "size": torch.Size([2, 3]), "dtype": torch.float16})


def _same(a, b, where="") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset(), a.requires_grad) == \
            (b.dtype, b.shape, b.stride(), b.storage_offset(), b.requires_grad), where
        assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes(), where
        assert bytes(a.untyped_storage()) == bytes(b.untyped_storage()), where  # bit for bit, NaN included
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_round_trip_equals_weights_only_load(tmp_path, zip_format):
    path = tmp_path / "ck.pt"
    torch.save(_container(), path, _use_new_zipfile_serialization=zip_format)
    ours = load_torch_file(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    _same(ours, theirs)
    _same(load_torch_file(path.read_bytes()), theirs)
    assert ours["view"].untyped_storage().data_ptr() == ours["f32"].untyped_storage().data_ptr()  # shared stays shared


def test_big_endian_zip_records_are_swapped(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4, dtype=torch.int32)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = b"".join(data[i:i + 4][::-1] for i in range(0, len(data), 4))
            dst.writestr(info.filename, data)
    assert torch.equal(load_torch_file(out.getvalue())["w"], torch.arange(4, dtype=torch.int32))


def test_broken_containers_fail_with_one_line(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    for bad in (data[:-10], data[:40], b"", b"not a checkpoint"):
        with pytest.raises(CheckpointError, match=r"^cannot read|^nested") as info:
            load_torch_file(bad)
        assert "\n" not in str(info.value)
    buf = io.BytesIO()
    torch.save({"w": torch.ones(1000)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:  # a record bigger than its tensor
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info) * (2 if "/data/" in info.filename else 1))
    with pytest.raises(CheckpointError, match="holds 8000 bytes, expected 4000"):
        load_torch_file(out.getvalue())
    with pytest.raises(CheckpointError, match="not found"):
        load_torch_file(tmp_path / "missing.pt")


def test_codecs_encode_only_latin1():
    data = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(CheckpointError, match="only latin1"):
        RestrictedUnpickler(io.BytesIO(data), allowed=tensor_globals()).load()


# ---- nested storages (the StyleGAN2 pickle layout) ------------------------------------------------------

@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_load_from_bytes_refuses_a_malicious_nested_payload(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    inner = io.BytesIO()
    torch.save({"x": WritesMarker(marker)}, inner, _use_new_zipfile_serialization=zip_format)
    for payload in (inner.getvalue(), pickle.dumps(WritesMarker(marker))):
        with pytest.raises(CheckpointError, match=r"builtins\.exec"):
            load_from_bytes(payload)
        # the same through an outer pickle whose storage goes through _load_from_bytes
        outer = (b"\x80\x04ctorch.storage\n_load_from_bytes\nB" + len(payload).to_bytes(4, "little") + payload
                 + b"\x85R.")
        with pytest.raises(CheckpointError, match=r"builtins\.exec"):
            RestrictedUnpickler(io.BytesIO(outer), allowed={("torch.storage", "_load_from_bytes"): load_from_bytes}).load()
    assert not marker.exists()


def test_load_from_bytes_reads_a_storage_payload():
    t = torch.randn(7)
    with warnings.catch_warnings():  # TypedStorage is deprecated; StyleGAN2 pickles store their tensors so
        warnings.simplefilter("ignore")
        storage_pickle = pickle.dumps(t.storage(), protocol=4)
    with pytest.raises(CheckpointError, match=r"torch\.storage\._load_from_bytes"):
        RestrictedUnpickler(io.BytesIO(storage_pickle), allowed={}).load()
    storage = RestrictedUnpickler(io.BytesIO(storage_pickle),
                                  allowed={("torch.storage", "_load_from_bytes"): load_from_bytes}).load()
    assert bytes(storage._untyped_storage) == bytes(t.untyped_storage()) and storage.dtype == torch.float32
