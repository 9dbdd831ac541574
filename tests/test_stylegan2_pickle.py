"""StyleGAN2-ADA snapshot pickles: official-layout round trip (C4) and malicious pickles (C3).

The official layout is made here without the official code: throw-away ``torch_utils.persistence`` and
``dnnlib.util`` modules exist only while pickling, and each module of our generator pickles as
``_reconstruct_persistent_obj(meta)`` with the module's ``__dict__`` as ``meta['state']``, as the
official persistence mechanism does. They are removed before loading, so the loader cannot use them.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import io
import math
import pickle
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from backbones._stylegan2 import Generator, SynthesisLayer, load_generator, load_stylegan2_pkl
from backbones._stylegan2_pickle import load_network_record
from bench.errors import CheckpointError
from helpers import WritesMarker

OFFICIAL = ("dnnlib", "dnnlib.util", "torch_utils", "torch_utils.persistence")
INIT = {"z_dim": 16, "c_dim": 0, "w_dim": 16, "img_resolution": 16, "img_channels": 3,
        "mapping_kwargs": {"num_layers": 2},
        "synthesis_kwargs": {"channel_base": 256, "channel_max": 32, "num_fp16_res": 2, "conv_clamp": 256}}
SRC = "# stand-in for training/networks.py\n"


@contextlib.contextmanager
def official_modules():
    """Stand-ins for the official modules, importable only inside the ``with``."""
    assert not any(name in sys.modules for name in OFFICIAL)
    mods = {name: types.ModuleType(name) for name in OFFICIAL}

    class EasyDict(dict):
        pass

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - the loader must never call it
        raise AssertionError("the official reconstructor ran")

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mods["dnnlib.util"].EasyDict = EasyDict
    mods["dnnlib"].util = mods["dnnlib.util"]
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    mods["torch_utils"].persistence = mods["torch_utils.persistence"]
    sys.modules.update(mods)
    try:
        yield mods
    finally:
        for name in OFFICIAL:
            sys.modules.pop(name, None)


class Persistent:
    """Pickles as the official persistent objects do: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, class_name: str, state: dict, module_src: str = SRC) -> None:
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


def official_tree(module: torch.nn.Module, init: dict | None = None, module_src: str = SRC) -> Persistent:
    """Our module tree in the official layout: ``__dict__`` state, persistent children, init args, and
    a NumPy scalar attribute like the official ``act_gain``."""
    easy = sys.modules["dnnlib.util"].EasyDict
    state = dict(module.__dict__)
    state["_modules"] = collections.OrderedDict(
        (n, None if m is None else official_tree(m, module_src=module_src)) for n, m in module._modules.items())
    state["_init_args"] = ()
    state["_init_kwargs"] = easy({k: easy(v) if isinstance(v, dict) else v for k, v in (init or {}).items()})
    if isinstance(module, SynthesisLayer):
        state["act_gain"] = np.float64(math.sqrt(2))
    return Persistent(type(module).__name__, state, module_src)


class ZipStoragePickler(pickle.Pickler):
    """Writes each storage as a zip-format ``torch.save`` payload (newer torch); the default is legacy."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.storage.TypedStorage):
            buf = io.BytesIO()
            torch.save(obj, buf)
            return torch.storage._load_from_bytes, (buf.getvalue(),)
        return NotImplemented


def tiny_pair(seed: int = 0) -> tuple[Generator, Generator]:
    """(G_ema, G): random weights with non-trivial biases/noise strengths; G = G_ema + noise."""
    torch.manual_seed(seed)
    g_ema = Generator(**INIT).eval()
    with torch.no_grad():
        for p in g_ema.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g = copy.deepcopy(g_ema)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return g_ema, g


def write_snapshot(path: Path, protocol: int, inner: str = "legacy", *, g_ema=None, g=None, module_src=SRC,
                   extra_state: dict | None = None) -> None:
    with official_modules() as mods, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation
        easy = mods["dnnlib.util"].EasyDict
        ema_tree = official_tree(g_ema, INIT, module_src)
        ema_tree.state.update(extra_state or {})
        snapshot = dict(training_set_kwargs=easy(path="x.zip", resolution=16), G=official_tree(g, INIT, module_src),
                        D=None, G_ema=ema_tree, augment_pipe=None)
        with open(path, "wb") as f:
            (ZipStoragePickler if inner == "zip" else pickle.Pickler)(f, protocol=protocol).dump(snapshot)


def assert_same_state(ours: dict, reference: dict) -> None:
    assert list(ours) == list(reference)
    for k, v in reference.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        bits = [t.contiguous().reshape(-1).view(torch.uint8) for t in (ours[k], v)]
        assert torch.equal(*bits), k  # bit for bit


# ---- C4 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [3, 5])
@pytest.mark.parametrize("inner", ["legacy", "zip"])
def test_official_layout_round_trip(tmp_path, protocol, inner):
    g_ema, g = tiny_pair()
    path = tmp_path / "network-snapshot.pkl"
    write_snapshot(path, protocol, inner, g_ema=g_ema, g=g)
    assert not any(name in sys.modules for name in OFFICIAL)
    assert (b"PK\x03\x04" in path.read_bytes()) == (inner == "zip")  # the nested payloads are of that format

    init_kwargs, state_dict = load_stylegan2_pkl(path)
    assert init_kwargs == INIT
    assert_same_state(state_dict, g_ema.state_dict())
    assert_same_state(load_stylegan2_pkl(path, key="G")[1], g.state_dict())
    layer = load_network_record(path).state["_modules"]["synthesis"].state["_modules"]["b8"].state["_modules"]["conv0"]
    assert layer.state["act_gain"] == math.sqrt(2) and type(layer.state["act_gain"]) is float
    assert layer.module_src_sha256 == hashlib.sha256(SRC.encode()).hexdigest()

    loaded = load_generator(path)
    ws = torch.randn(2, loaded.num_ws, 16)
    with torch.no_grad():
        assert torch.equal(loaded.synthesis(ws, return_features=False), g_ema.synthesis(ws, return_features=False))
    assert not any(name in sys.modules for name in OFFICIAL)


def test_wrong_key_and_wrong_shapes_are_reported(tmp_path):
    g_ema, g = tiny_pair()
    path = tmp_path / "snap.pkl"
    write_snapshot(path, 4, g_ema=g_ema, g=g)
    with pytest.raises(CheckpointError, match=r"has no 'G_emma'; top-level keys: 'training_set_kwargs', 'G'"):
        load_stylegan2_pkl(path, key="G_emma")
    with pytest.raises(CheckpointError, match="is a NoneType, not a network"):
        load_stylegan2_pkl(path, key="D")
    bad = tmp_path / "bad.pkl"
    write_snapshot(bad, 4, g_ema=g_ema, g=g, extra_state={"_init_kwargs": {**INIT, "z_dim": 8}})
    with pytest.raises(CheckpointError, match=r"mapping.fc0.weight' has shape \(16, 16\), expected \(16, 8\)"):
        load_generator(bad)
    resnet = {**INIT, "synthesis_kwargs": {**INIT["synthesis_kwargs"], "architecture": "resnet"}}
    write_snapshot(bad, 4, g_ema=g_ema, g=g, extra_state={"_init_kwargs": resnet})
    with pytest.raises(CheckpointError, match=r"bad\.pkl: cannot build its generator .*architecture 'resnet'"):
        load_generator(bad)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="^cannot read .*truncated") as info:
        load_stylegan2_pkl(truncated)
    assert "\n" not in str(info.value)


# ---- C3 ------------------------------------------------------------------------------------------------

def test_module_src_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    src = f"open({str(marker)!r}, 'w').write('pwned')\n"
    g_ema, g = tiny_pair()
    path = tmp_path / "snap.pkl"
    write_snapshot(path, 3, g_ema=g_ema, g=g, module_src=src)
    load_generator(path)
    assert load_network_record(path).module_src_sha256 == hashlib.sha256(src.encode()).hexdigest()
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [3, 5])
def test_malicious_state_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    g_ema, g = tiny_pair()
    path = tmp_path / "snap.pkl"
    write_snapshot(path, protocol, g_ema=g_ema, g=g, extra_state={"act_gain": WritesMarker(marker)})
    with pytest.raises(CheckpointError, match=r"snap\.pkl refers to the Python global builtins\.exec"):
        load_stylegan2_pkl(path)
    write_snapshot(path, protocol, g_ema=g_ema, g=g, extra_state={"fc": torch.nn.Identity()})
    with pytest.raises(CheckpointError, match=r"global torch\.nn\.modules\.linear\.Identity"):
        load_stylegan2_pkl(path)
    assert not marker.exists()


def test_malicious_nested_storage_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class EvilStorages(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, torch.storage.TypedStorage):
                return torch.storage._load_from_bytes, (pickle.dumps(WritesMarker(marker)),)
            return NotImplemented

    with official_modules():
        tree = official_tree(tiny_pair()[0], INIT)
        data = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            EvilStorages(data, protocol=4).dump({"G_ema": tree})
    path = tmp_path / "snap.pkl"
    path.write_bytes(data.getvalue())
    with pytest.raises(CheckpointError, match=r"builtins\.exec"):
        load_stylegan2_pkl(path)
    assert not marker.exists()


def test_persistent_ids_are_refused(tmp_path):
    class WithPersistentIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "x" if isinstance(obj, torch.Tensor) else None

    with official_modules():
        data = io.BytesIO()
        WithPersistentIds(data, protocol=4).dump({"G_ema": official_tree(tiny_pair()[0], INIT)})
    path = tmp_path / "snap.pkl"
    path.write_bytes(data.getvalue())
    with pytest.raises(CheckpointError, match="persistent id"):
        load_stylegan2_pkl(path)


def test_tensorflow_pickles_point_to_the_converter(tmp_path):
    network = type("Network", (), {"__module__": "dnnlib.tflib.network", "__getstate__": lambda self: {"name": "G"}})
    names = ("dnnlib", "dnnlib.tflib", "dnnlib.tflib.network")
    sys.modules.update({name: types.ModuleType(name) for name in names})
    sys.modules["dnnlib.tflib.network"].Network = network
    try:
        data = pickle.dumps((network(), network(), network()), protocol=3)
    finally:
        for name in names:
            del sys.modules[name]
    path = tmp_path / "stylegan2-cat-config-f.pkl"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"TensorFlow-era StyleGAN2 pickle.*legacy\.py") as info:
        load_stylegan2_pkl(path)
    assert "\n" not in str(info.value)
