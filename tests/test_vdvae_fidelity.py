"""VDVAE vs the official code: activations recorded from openai/vdvae (tests/fixtures/vdvae/README.md).

The reference is the recorded data itself (official code, CPU, float32, replayed eps): encoder
activations, decoder states, posterior statistics, KL, head output and the dense features. Tolerance:
the README's 5e-6 absolute. Each cheap wrong variant of the README's sensitivity table must exceed it.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import backbones._vdvae_net as net
import bench

FIXTURE = Path(__file__).parent / "fixtures" / "vdvae"
TOLERANCE = 5e-6  # README "Suggested tolerance"
META = json.loads((FIXTURE / "metadata.json").read_text())
N_BLOCKS = META["n_dec_blocks"]
ENC_RES, DEC_RES = [32, 16, 8, 4, 1], [1, 4, 8, 16, 32]


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    out = load_file(str(FIXTURE / "inputs.safetensors"))
    out.update(load_file(str(FIXTURE / "activations.safetensors")))
    out.update(load_file(str(FIXTURE / "features.safetensors")))
    out["images"] = out["image_uint8_nhwc"].permute(0, 3, 1, 2).contiguous()  # the harness's [B, 3, H, W]
    out["eps"] = [out[f"eps.dec_blocks.{i}"] for i in range(N_BLOCKS)]
    return out


@pytest.fixture(scope="module")
def backbone() -> bench.Backbone:
    # The official hyper-parameters, given as the official names (the file stores none).
    return bench.create_backbone("vdvae", checkpoint=FIXTURE / "fixture-model-ema.th", arch=META["hparams"])


def _run(model: torch.nn.Module, x: torch.Tensor, eps: list[torch.Tensor] | None) -> dict:
    with torch.no_grad():
        return model(x, eps)


def _errors(out: dict, data: dict) -> dict[str, float]:
    """Max abs difference per group against the recording."""
    enc = max((out["enc"][r] - data[f"encoder.activations.{r}"]).abs().max().item() for r in ENC_RES)
    dec = max((out["xs"][r] - data[f"decoder.xs.{r}"]).abs().max().item() for r in DEC_RES)
    return {"encoder": enc, "decoder": dec}


def _dense(maps: list[torch.Tensor], mode: str = "bilinear", align_corners: bool | None = False) -> torch.Tensor:
    """The fixture's feature recipe (upsample every map to 32, concatenate), every 4th channel as stored."""
    up = [F.interpolate(m, size=(32, 32), mode=mode, align_corners=align_corners) for m in maps]
    return torch.cat(up, dim=1)[:, ::4]


def _feature_error(dense: torch.Tensor, data: dict) -> float:
    want = torch.stack([data["features.sample0.channels0::4"], data["features.sample1.channels0::4"]])
    return (dense - want).abs().max().item()


# ---- equivalence (replayed eps) -------------------------------------------------------------------

def test_preprocessing_is_bitwise_the_official_input(backbone, data):
    assert torch.equal(backbone.preprocess(data["images"]), data["x_nhwc_preprocessed"])


def test_encoder_decoder_and_posterior_match(backbone, data):
    out = _run(backbone.model, data["x_nhwc_preprocessed"], data["eps"])
    errors = _errors(out, data)
    for i, stats in enumerate(out["stats"]):
        for key in ("qm", "qv", "z"):
            errors[f"{key}"] = max(errors.get(key, 0.0), (stats[key] - data[f"dec_blocks.{i}.{key}"]).abs().max().item())
    print("max abs errors:", errors)
    assert max(errors.values()) <= TOLERANCE
    kl = torch.stack([net.gaussian_kl(s["qm"], s["qv"], s["pm"], s["pv"]).sum() for s in out["stats"]])
    torch.testing.assert_close(kl, data["kl.dec_blocks"], rtol=1e-5, atol=TOLERANCE)  # sums of up to 8192 terms
    head = backbone.model.decoder.out_net(out["xs"][32])[:, ::8]
    assert (head - data["dmol_logits_nhwc.rows0::8"]).abs().max().item() <= TOLERANCE


def test_features_match(backbone, data, monkeypatch):
    monkeypatch.setattr(backbone, "latent_noise", lambda x: data["eps"])  # replay the recorded noise
    maps = backbone.extract(data["images"])
    assert [f.name for f in backbone.feature_info] == [f"enc{r}" for r in ENC_RES] + [f"dec{r}" for r in DEC_RES]
    error = _feature_error(_dense(maps), data)
    print("features max abs error:", error)
    assert error <= TOLERANCE
    # The harness's own dense path (bench.features.upsample_concat) gives the same.
    from bench.features import upsample_concat

    assert _feature_error(upsample_concat(maps, 32)[:, ::4], data) <= TOLERANCE


def test_each_sample_alone_stays_within_tolerance(backbone, data):
    """README control: batch 1 vs batch 2 differs only by rounding (< 1e-6)."""
    for b in range(2):
        out = _run(backbone.model, data["x_nhwc_preprocessed"][b:b + 1], [e[b:b + 1] for e in data["eps"]])
        sliced = {k: v[b:b + 1] if torch.is_tensor(v) else v for k, v in data.items()}
        assert max(_errors(out, sliced).values()) <= TOLERANCE


# ---- sensitivity: each wrong variant must fail the same comparison --------------------------------

def test_nchw_misread_fails(backbone, data):
    # The NHWC uint8 array taken for NCHW by a reshape: what a loader that forgets the layout does.
    misread = data["image_uint8_nhwc"].reshape(2, 3, 32, 32)
    assert _errors(_run(backbone.model, backbone.preprocess(misread), data["eps"]), data)["encoder"] > 0.1


def test_minus1_plus1_scaling_fails(backbone, data):
    x = data["image_uint8_nhwc"].float() / 127.5 - 1
    assert _errors(_run(backbone.model, x, data["eps"]), data)["encoder"] > 100 * TOLERANCE


def test_fresh_noise_fails(backbone, data):
    x = data["x_nhwc_preprocessed"]
    errors = _errors(_run(backbone.model, x, backbone.latent_noise(x)), data)
    assert errors["encoder"] <= TOLERANCE and errors["decoder"] > 0.1


def test_posterior_mean_fails(backbone, data):
    errors = _errors(_run(backbone.model, data["x_nhwc_preprocessed"], None), data)
    assert errors["encoder"] <= TOLERANCE and errors["decoder"] > 0.1


def test_tanh_gelu_fails(backbone, data, monkeypatch):
    monkeypatch.setattr(net, "_act", lambda x: F.gelu(x, approximate="tanh"))
    errors = _errors(_run(backbone.model, data["x_nhwc_preprocessed"], data["eps"]), data)
    print("tanh GELU errors:", errors)
    assert errors["decoder"] > TOLERANCE  # README: 1.4e-5, the closest wrong variant


def test_bilinear_mixin_fails(backbone, data, monkeypatch):
    monkeypatch.setattr(net, "MIXIN_MODE", "bilinear")
    assert _errors(_run(backbone.model, data["x_nhwc_preprocessed"], data["eps"]), data)["decoder"] > 0.1


@pytest.mark.parametrize("variant", ["no_gain_bias", "no_bias_xs"])
def test_decoder_start_and_top_variants_fail(backbone, data, variant):
    model = copy.deepcopy(backbone.model)
    with torch.no_grad():
        if variant == "no_gain_bias":  # the top state taken before gain/bias
            model.decoder.gain.fill_(1.0)
            model.decoder.bias.zero_()
        else:  # decoder starting from zeros
            for p in model.decoder.bias_xs:
                p.zero_()
    assert _errors(_run(model, data["x_nhwc_preprocessed"], data["eps"]), data)["decoder"] > 0.1


def test_first_activation_per_resolution_fails(backbone, data):
    encoder = backbone.model.encoder
    with torch.no_grad():
        x = encoder.in_conv(data["x_nhwc_preprocessed"].permute(0, 3, 1, 2))
        first = {x.shape[-1]: x}
        for block in encoder.enc_blocks:
            x = block(x)
            first.setdefault(x.shape[-1], x)  # keep the first, not the last
    assert max((first[r] - data[f"encoder.activations.{r}"]).abs().max().item() for r in ENC_RES) > 0.1


@pytest.mark.parametrize("mode, align_corners", [("bilinear", True), ("nearest", None)])
def test_other_feature_resampling_fails(backbone, data, monkeypatch, mode, align_corners):
    monkeypatch.setattr(backbone, "latent_noise", lambda x: data["eps"])
    maps = backbone.extract(data["images"])
    assert _feature_error(_dense(maps, mode, align_corners), data) > 0.1
