"""Safe checkpoint loading, strict key/shape checks and atomic safetensors writes."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import safetensors
import torch

from bench import checkpoints
from bench.checkpoints import check_state_dict, load_state_dict, load_strict, save_safetensors, strip_prefix
from bench.errors import CheckpointError
from helpers import WritesMarker


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- loading ------------------------------------------------------------------------------------


def test_plain_pt_state_dict(tmp_path):
    sd = _net().state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    _assert_same(load_state_dict(tmp_path / "plain.pt"), dict(sd))


def test_container_with_module_prefix_loads_into_the_model(tmp_path):
    trained = _net()
    wrapped = {"module." + k: v for k, v in trained.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 7, "arch": "resnet"}, tmp_path / "swav.pth")
    sd = strip_prefix(load_state_dict(tmp_path / "swav.pth"), "module.")
    fresh = _net()
    load_strict(fresh, sd, source="swav.pth")
    _assert_same(fresh.state_dict(), trained.state_dict())


def test_container_key_choice(tmp_path):
    weights = {"w": torch.ones(2)}
    torch.save({"model": weights, "optimizer": {"state": {}}, "epoch": 1}, tmp_path / "mae.pth")
    _assert_same(load_state_dict(tmp_path / "mae.pth"), weights)  # found under "model"
    torch.save({"ema": weights, "step": 3}, tmp_path / "ema.pt")
    _assert_same(load_state_dict(tmp_path / "ema.pt", key="ema"), weights)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path / "ema.pt")
    assert "ema.pt" in str(err.value) and "'ema'" in str(err.value) and "'step'" in str(err.value)
    with pytest.raises(CheckpointError, match="no entry 'teacher'.*'ema'"):
        load_state_dict(tmp_path / "ema.pt", key="teacher")


def test_safetensors_roundtrip_with_metadata(tmp_path):
    sd = {"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.zeros(1, dtype=torch.float16)}
    path = save_safetensors(sd, tmp_path / "w.safetensors", metadata={"tag": "demo"})
    _assert_same(load_state_dict(path), {k: v.contiguous() for k, v in sd.items()})
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata() == {"tag": "demo"}


def test_tied_weights_can_be_saved(tmp_path):
    shared = torch.randn(3, 3)
    path = save_safetensors({"embed": shared, "head": shared}, tmp_path / "tied.safetensors")
    loaded = load_state_dict(path)
    assert torch.equal(loaded["embed"], shared) and torch.equal(loaded["head"], shared)


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    # Prove the file is really malicious: an unsafe load runs the payload.
    probe_marker = tmp_path / "probe_marker"
    torch.save({"w": WritesMarker(probe_marker)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe_marker.exists()

    marker = tmp_path / "marker"
    torch.save({"w": WritesMarker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path / "evil.pt")
    message = str(err.value)
    assert "evil.pt" in message and "exec" in message and "nothing from the file was executed" in message
    assert not marker.exists()


class _CustomArgs:
    """A plain class that is NOT on the allow-list (stands for any unknown pickled object)."""

    def __init__(self) -> None:
        self.lr = 0.1


def test_namespace_in_checkpoint_is_accepted_but_other_classes_are_refused(tmp_path):
    # The MAE checkpoints store their training args as an argparse.Namespace next to the weights
    # (util/misc.save_model): that one class is allowed, any other custom class is still refused.
    torch.save({"model": {"w": torch.ones(1)}, "optimizer": {"state": {}}, "epoch": 3, "scaler": {"scale": 2.0},
                "args": argparse.Namespace(lr=0.1, model="mae_vit_large_patch8")}, tmp_path / "mae.pth")
    _assert_same(load_state_dict(tmp_path / "mae.pth"), {"w": torch.ones(1)})
    torch.save({"model": {"w": torch.ones(1)}, "args": _CustomArgs()}, tmp_path / "custom.pth")
    with pytest.raises(CheckpointError, match=r"custom\.pth.*_CustomArgs.*nothing from the file was executed"):
        load_state_dict(tmp_path / "custom.pth")


def test_namespace_holding_a_malicious_value_is_refused(tmp_path):
    # An allowed container class must not become a way in: its contents pass the same allow-list.
    marker = tmp_path / "marker"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(x=WritesMarker(marker))},
               tmp_path / "evil_args.pth")
    with pytest.raises(CheckpointError, match=r"evil_args\.pth.*exec"):
        load_state_dict(tmp_path / "evil_args.pth")
    assert not marker.exists()


def test_allowed_globals_feed_torch_load(tmp_path, monkeypatch):
    # The hook is the single place that widens the allow-list: with it emptied, Namespace is refused.
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "mae.pth")
    monkeypatch.setattr(checkpoints, "_allowed_globals", lambda: [])
    with pytest.raises(CheckpointError, match=r"mae\.pth.*argparse\.Namespace.*nothing from the file was executed"):
        load_state_dict(tmp_path / "mae.pth")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_missing_truncated_and_corrupt_files(tmp_path, suffix):
    with pytest.raises(CheckpointError, match=f"absent{suffix}"):
        load_state_dict(tmp_path / f"absent{suffix}")
    good = tmp_path / f"good{suffix}"
    sd = {"w": torch.randn(64, 64)}
    torch.save(sd, good) if suffix == ".pt" else save_safetensors(sd, good)
    data = good.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cut{suffix}.*truncated or corrupt"):
        load_state_dict(tmp_path / f"cut{suffix}")
    (tmp_path / f"junk{suffix}").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match=f"junk{suffix}"):
        load_state_dict(tmp_path / f"junk{suffix}")


# ---- key and shape checks -----------------------------------------------------------------------


def test_missing_key_message_names_first_in_module_order():
    sd = _net().state_dict()
    del sd["2.bias"], sd["0.weight"]
    with pytest.raises(CheckpointError) as err:
        check_state_dict(_net(), sd, source="cat.pt")
    message = str(err.value)
    assert "cat.pt" in message and "missing key '0.weight'" in message and "(4, 3)" in message
    assert "2 missing, 0 unexpected" in message


def test_unexpected_key_message():
    sd = _net().state_dict()
    sd["head.weight"] = torch.zeros(5, 2)
    with pytest.raises(CheckpointError, match=r"unexpected key 'head\.weight' \(shape \(5, 2\)\).*0 missing, 1 unexpected"):
        check_state_dict(_net(), sd, source="x.pt")


def test_wrong_shape_message_names_both_shapes():
    sd = _net().state_dict()
    sd["2.weight"] = torch.zeros(3, 4)
    with pytest.raises(CheckpointError, match=r"x\.pt.*'2\.weight' has shape \(3, 4\), expected \(2, 4\)"):
        check_state_dict(_net(), sd, source="x.pt")


def test_expected_shapes_as_mapping_and_prefix_hint():
    check_state_dict({"w": (2,)}, {"w": torch.zeros(2)}, source="ok")
    with pytest.raises(CheckpointError, match="prefix 'module.'"):
        check_state_dict({"w": (2,)}, {"module.w": torch.zeros(2)}, source="dp.pt")


def test_strip_prefix_only_touches_keys_that_have_it():
    sd = {"module.a": torch.ones(1), "b": torch.zeros(1)}
    assert list(strip_prefix(sd, "module.")) == ["a", "b"]
    with pytest.raises(CheckpointError, match="'a'"):
        strip_prefix({"module.a": torch.ones(1), "a": torch.ones(1)}, "module.")


def test_load_strict_on_meta_device_with_fp16_checkpoint():
    source = _net()
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in source.state_dict().items()}
    with torch.device("meta"):
        model = _net()
    load_strict(model, half, source="half.safetensors")
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu", name
        assert tensor.dtype == source.state_dict()[name].dtype, name
        assert torch.equal(tensor, half[name].to(tensor.dtype)), name
    assert isinstance(model[0].weight, torch.nn.Parameter) and model[0].weight.requires_grad
    model(torch.randn(2, 3))  # a usable model, not meta tensors


def test_load_strict_refuses_before_touching_the_model():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    del sd["1.running_mean"]
    with pytest.raises(CheckpointError, match="1.running_mean"):
        load_strict(model, sd, source="bn.pt")
    _assert_same(model.state_dict(), before)


# ---- atomic writes ------------------------------------------------------------------------------


def test_save_safetensors_leaves_no_temp_file_and_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_safetensors({"w": torch.ones(2)}, path)
    save_safetensors({"w": torch.full((2,), 2.0)}, path)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]

    import safetensors.torch

    def crash_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"w": torch.zeros(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    monkeypatch.undo()
    _assert_same(load_state_dict(path), {"w": torch.full((2,), 2.0)})


def test_save_safetensors_rejects_non_tensors(tmp_path):
    with pytest.raises(CheckpointError, match="'step'"):
        save_safetensors({"w": torch.ones(1), "step": 3}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []
