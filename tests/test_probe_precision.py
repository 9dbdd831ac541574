"""The probe's precision modes (bench.probe_precision): bf16/fp16 first-layer GEMMs, fp32 untouched.

Correctness only, no speed: a low-precision mode must train (loss falls), agree with fp32 on a small
learnable problem, compute the same weight gradient as float32 math on the rounded inputs, keep a
member's own data stream and early stop, and enter the run key; fp32 must stay the reference path.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import helpers
from bench.errors import BenchError
from bench.probe import (EnsembleMLP, TensorPixelSource, TrainConfig, config_key_parts, predict_chunked,
                         train_ensemble)
from bench.probe_precision import LowPrecisionFirstLayer, cpu_has_fast_bf16, resolve_precision


def blobs(n: int, dim: int = 32, classes: int = 4, seed: int = 0, sample_seed: int | None = None):
    return helpers.blobs(n, dim, classes, seed, sample_seed)


STAGGERED = TrainConfig(members=3, max_epochs=10, min_epochs=1, patience=3)


def test_bf16_trains_and_agrees_with_fp32_on_a_learnable_problem():
    feats, labels = blobs(1280, seed=1)
    test_feats, test_labels = blobs(2000, seed=1, sample_seed=7)
    results = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(members=3, max_epochs=5, precision=precision)
        ens, infos = train_ensemble(TensorPixelSource(feats.half(), labels), 4, seeds=[0, 1, 2], config=config,
                                    progress=False)
        assert ens.precision == precision
        assert all(i["final_loss"] < 0.5 * math.log(4) for i in infos), infos  # from ln 4 at the start
        results[precision] = predict_chunked(ens, lambda s: test_feats[s], 2000, chunk=700)
    for labels_pred, _ in results.values():
        assert (labels_pred == test_labels).float().mean() > 0.95
    agree = (results["fp32"][0] == results["bf16"][0]).float().mean().item()
    assert agree > 0.97, agree
    torch.testing.assert_close(results["bf16"][1], results["fp32"][1], atol=0.05, rtol=0)  # JS uncertainty


def test_explicit_fp32_is_the_default_path_bit_for_bit():
    feats, labels = blobs(640)
    default = train_ensemble(TensorPixelSource(feats, labels), 4, seeds=[3, 4, 5], config=STAGGERED, progress=False)
    explicit = train_ensemble(TensorPixelSource(feats, labels), 4, seeds=[3, 4, 5], progress=False,
                              config=TrainConfig(members=3, max_epochs=10, min_epochs=1, patience=3, precision="fp32"))
    assert default[1] == explicit[1]
    for name, value in default[0].state_dict().items():
        assert torch.equal(value, explicit[0].state_dict()[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weight_gradient_is_float32_math_on_rounded_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 40, 6, generator=g) * 0.02
    x = torch.randn(3, 16, 40, generator=g)
    upstream = torch.randn(3, 16, 6, generator=g) * 1e-6  # tiny: fp16 would flush x^T g to zero unscaled
    layer = LowPrecisionFirstLayer(weight, dtype)
    out = layer.forward(x.to(dtype))
    (out * upstream).sum().backward()
    layer.weight_gradient()
    x_rounded, w_rounded = x.to(dtype).float(), weight.to(dtype).float()
    torch.testing.assert_close(out.detach(), torch.bmm(x_rounded, w_rounded).to(dtype).float())
    reference = torch.bmm(x_rounded.transpose(1, 2), upstream)  # float32 math, exact upstream gradient
    assert layer.grad.dtype == torch.float32
    # rounding of the upstream gradient and of the GEMM's output: a few units of the dtype's last bit
    # (fp16 keeps its 11 bits here only because the gradient is scaled before the cast)
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    torch.testing.assert_close(layer.grad, reference, rtol=0, atol=8 * unit * reference.abs().max().item())
    # the copy follows the master weight after an update, in place
    low_before = layer.low
    with torch.no_grad():
        weight.add_(1.0)
    layer.refresh()
    assert layer.low is low_before and torch.equal(layer.low, weight.to(dtype))


def test_fp16_gradient_scaling_keeps_large_features_finite():
    layer = LowPrecisionFirstLayer(torch.randn(1, 64, 4) * 0.02, torch.float16)
    x = torch.full((1, 64, 64), 300.0)  # 64 products of 300 * 10 = 192000 > fp16's 65504 without scaling
    out = layer.forward(x.half())
    (out * 10.0).sum().backward()
    layer.weight_gradient()
    torch.testing.assert_close(layer.grad, torch.full((1, 64, 4), 64 * 300.0 * 10.0))


@pytest.mark.parametrize("prefetch", [False, True])
def test_bf16_members_keep_their_own_streams_and_stops(monkeypatch, prefetch):
    import bench.probe as probe

    feats, labels = blobs(640, dim=16, classes=3)  # the staggered-stop data of test_probe.py
    monkeypatch.setattr(probe, "_prefetch_batches", lambda source, config, device: prefetch)
    config = TrainConfig(members=3, max_epochs=10, min_epochs=1, patience=3, precision="bf16")
    ens, infos = train_ensemble(TensorPixelSource(feats, labels), 3, seeds=[3, 4, 5], config=config, progress=False)
    assert len({i["steps"] for i in infos}) > 1  # members retire at different steps: the working set shrinks
    # each member trained alone (same seed) stops at the same step and predicts the same: retirement and
    # batching change nothing but rounding (which Adam amplifies where a gradient is ~0, so the weights
    # are compared through what they predict)
    batched_labels, _ = ens.predict(feats)
    for m, seed in enumerate([3, 4, 5]):
        alone, info = train_ensemble(TensorPixelSource(feats, labels), 3, seeds=[seed], progress=False,
                                     config=TrainConfig(members=1, max_epochs=10, min_epochs=1, patience=3,
                                                        precision="bf16"))
        assert (info[0]["steps"], info[0]["stop_epoch"]) == (infos[m]["steps"], infos[m]["stop_epoch"])
        assert info[0]["final_loss"] == pytest.approx(infos[m]["final_loss"], abs=0.05)
        alone_labels, _ = alone.predict(feats)
        assert (alone_labels[0] == batched_labels[m]).float().mean() > 0.99


def test_bf16_prediction_rounds_the_first_layer_only():
    ens = EnsembleMLP(32, 4, members=3, seeds=[0, 1, 2], precision="bf16").eval()
    feats = torch.randn(50, 32)
    labels, probs = ens.predict(feats)
    ens.precision = "fp32"
    labels32, probs32 = ens.predict(feats)
    assert labels.shape == labels32.shape and probs.dtype == torch.float32
    torch.testing.assert_close(probs, probs32, atol=0.02, rtol=0)
    assert not torch.equal(probs, probs32)  # the bf16 path really ran


def test_resolve_precision_and_refusals():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("auto", "cpu", num_features=8448) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("auto", "cpu", num_features=864) == "fp32"  # narrow features: bf16 gains nothing
    with pytest.raises(BenchError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(BenchError, match="must be one of fp32, bf16, fp16, got 'half'"):
        resolve_precision("half", "cpu")
    with pytest.raises(BenchError, match="fp16 needs a CUDA device"):
        train_ensemble(TensorPixelSource(*blobs(130)), 4, seeds=[0], progress=False,
                       config=TrainConfig(members=1, precision="fp16"))


def test_precision_enters_the_run_key_and_the_result(tmp_path: Path):
    from bench.runner import RunSpec, plan, run

    assert "precision" not in config_key_parts(TrainConfig())  # fp32 keys are what they were
    common = dict(seed=0, max_train=2, max_test=1, members=2, out=tmp_path / "r", cache=tmp_path / "c",
                  progress=False)
    keys = {pr: plan(RunSpec("pixels", "demo", probe_precision=pr, **common)) for pr in ("fp32", "bf16")}
    assert keys["fp32"].run_key != keys["bf16"].run_key
    assert keys["bf16"].key_parts["probe"]["precision"] == "bf16" and "precision" not in keys["fp32"].key_parts["probe"]
    result = run(RunSpec("pixels", "demo", probe_precision="bf16", **common))
    assert result["config"]["probe_precision"] == "bf16"
    # the same label holding a bf16 result is never served for fp32
    with pytest.raises(BenchError, match="another configuration"):
        run(RunSpec("pixels", "demo", probe_precision="fp32", **common))
