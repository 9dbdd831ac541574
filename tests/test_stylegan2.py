"""StyleGAN2-ADA generator: golden fixture (official code, tolerance 1e-4), sensitivity variants, manifests
(C1), feature dims (C2), malicious pickles (C3), official-layout round trip (C4), determinism (C8)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import backbones._stylegan2 as sg
import backbones._stylegan2_ops as ops
from backbones._stylegan2 import Generator, load_generator, load_stylegan2_pkl
from bench.errors import BenchError

FIXTURE = Path(__file__).parent / "fixtures" / "stylegan2ada"
PKL = FIXTURE / "network-snapshot-000000.reduced.pkl"
TOL = 1e-4  # README: rounding variants stay below 6e-6, every listed wrong variant is above 1e-3
FEATURE_STEP = 16  # features_subset keeps every 16th channel of wplus.features.sample0
CONFIGS_256 = {  # manifest -> (channel_base, mapping layers, entries, elements, channels of the 14 maps)
    "configf_map8": (32768, 8, 144, 30_209_906, [512] * 10 + [256] * 2 + [128] * 2),
    "paper256_map8": (16384, 8, 144, 24_943_026, [512] * 8 + [256] * 2 + [128] * 2 + [64] * 2),
    "auto_map2": (16384, 2, 132, 23_367_090, [512] * 8 + [256] * 2 + [128] * 2 + [64] * 2),
}


@pytest.fixture(scope="module")
def G() -> Generator:
    return load_generator(PKL)


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "inputs.safetensors"))


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "activations.safetensors"))


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((FIXTURE / "metadata.json").read_text())


def record(G: Generator, ws: torch.Tensor, prefix: str, **kwargs) -> dict[str, torch.Tensor]:
    """Our outputs under the fixture's names: every SynthesisLayer, ToRGB output, running image, image."""
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for block in G.synthesis.blocks():
        name = f"{prefix}.synthesis.b{block.resolution}"
        hooks.append(block.torgb.register_forward_hook(lambda m, i, o, n=name: out.__setitem__(f"{n}.torgb", o)))
        hooks.append(block.register_forward_hook(lambda m, i, o, n=name: out.__setitem__(f"{n}.img", o[1])))
    try:
        with torch.no_grad():
            img, maps = G.synthesis(ws, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    out[f"{prefix}.image"] = img
    out["synthesis.b4.const"] = maps[0][0]
    for info, m in zip(G.feature_info[1:], maps[1:]):
        out[f"{prefix}.{info.name}"] = m
    return out


def max_err(ours: dict[str, torch.Tensor], golden: dict[str, torch.Tensor]) -> float:
    return max((v.float() - golden[k]).abs().max().item() for k, v in ours.items())


# ---- the fixture itself ------------------------------------------------------------------------------

def test_fixture_files_are_intact():
    sums = {line.split("|")[1].strip(" `"): line.split("|")[3].strip(" `")
            for line in (FIXTURE / "README.md").read_text().splitlines() if line.startswith("| `") and "|" in line[3:]}
    for name in ("network-snapshot-000000.reduced.pkl", "activations.safetensors", "inputs.safetensors",
                 "features_subset.safetensors", "metadata.json"):
        assert hashlib.sha256((FIXTURE / name).read_bytes()).hexdigest() == sums[name], name


def test_snapshot_loads_as_data(meta):
    import sys

    init_kwargs, state_dict = load_stylegan2_pkl(PKL)
    assert init_kwargs == meta["G_init_kwargs"]
    assert [[k, list(v.shape), str(v.dtype)[6:]] for k, v in state_dict.items()] == meta["state_dict_manifest"]
    assert all(type(v) is torch.Tensor for v in state_dict.values())
    assert not any(m.split(".")[0] in ("torch_utils", "dnnlib") for m in sys.modules)  # nothing imported


# ---- equivalence with the official generator (fixture, tolerance 1e-4) --------------------------------

def test_mapping_matches_the_fixture(G, inputs, golden):
    with torch.no_grad():
        psi1 = G.mapping(inputs["z"])
        trunc = G.mapping(inputs["z"], truncation_psi=0.7, truncation_cutoff=4)
    assert (psi1 - golden["mapping.ws_psi1"]).abs().max() < TOL
    assert (trunc - golden["mapping.ws_trunc"]).abs().max() < TOL


@pytest.mark.parametrize("prefix", ["gen", "wplus"])
def test_synthesis_matches_the_fixture(G, inputs, golden, prefix):
    ws = golden["mapping.ws_trunc"] if prefix == "gen" else inputs["wplus"]
    ours = record(G, ws, prefix)
    expected = {k for k in golden if k.startswith(prefix + ".")} | {"synthesis.b4.const"}
    assert set(ours) == expected
    assert max_err(ours, golden) < TOL
    if prefix == "gen":  # the full generator gives the same image as mapping + synthesis
        with torch.no_grad():
            img = G(inputs["z"], truncation_psi=0.7, truncation_cutoff=4)
        assert (img - golden["gen.image"]).abs().max() < TOL


def features(maps: list[torch.Tensor], size: int, **interp) -> torch.Tensor:
    interp = interp or {"mode": "bilinear", "align_corners": False}
    return torch.cat([F.interpolate(m, size=(size, size), **interp) for m in maps], dim=1)


def test_features_match_the_fixture(G, inputs):
    subset = load_file(str(FIXTURE / "features_subset.safetensors"))["wplus.features.sample0.every16"]
    with torch.no_grad():
        _, maps = G.synthesis(inputs["wplus"])
    ours = features(maps, 32)[0, ::FEATURE_STEP]
    assert ours.shape == subset.shape == (44, 32, 32)
    assert (ours - subset).abs().max() < TOL


@pytest.mark.parametrize("variant", ["unfused modulated conv", "each sample as batch 1"])
def test_rounding_variants_stay_within_tolerance(G, inputs, golden, variant):
    if variant == "unfused modulated conv":
        ours = record(G, inputs["wplus"], "wplus", fused_modconv=False)
    else:
        ours = {}
        for i in range(2):
            for k, v in record(G, inputs["wplus"][i:i + 1], "wplus").items():
                ours.setdefault(k, []).append(v)
        ours = {k: torch.cat(v) if k != "synthesis.b4.const" else v[0] for k, v in ours.items()}
    assert max_err(ours, golden) < TOL


# ---- sensitivity table: each wrong variant must fail the comparison --------------------------------------

def _nearest_up_conv(x, w, *, up, padding, f, groups):
    if up == 1:
        return F.conv2d(x, w, padding=padding, groups=groups)
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, padding=padding, groups=groups)


def _torgb_reads_own_conv1_row(self, ws):
    out, i = [], 0
    for block in self.blocks():
        rows = ws.narrow(1, i, block.num_conv)
        out.append(torch.cat([rows, rows[:, -1:]], dim=1))
        i += block.num_conv
    return out


SYNTHESIS_VARIANTS = ["noise none", "noise random", "noise_strength ignored", "no demodulation",
                      "demodulation eps 1e-1", "no sqrt(2) gain", "conv0 nearest upsample", "box resample filter",
                      "ToRGB uses its own conv1 w", "fp16 top layers", "loaded G instead of G_ema"]


@pytest.mark.parametrize("variant", SYNTHESIS_VARIANTS)
def test_wrong_synthesis_variants_fail(G, inputs, golden, monkeypatch, variant):
    model, kwargs = G, {}
    if variant == "noise none":
        kwargs = {"noise_mode": "none"}
    elif variant == "noise random":
        kwargs = {"noise_mode": "random", "generator": torch.Generator().manual_seed(0)}
    elif variant in ("noise_strength ignored", "box resample filter", "loaded G instead of G_ema"):
        model = load_generator(PKL, key="G" if variant.startswith("loaded") else "G_ema")
        for name, t in model.state_dict().items():
            if variant == "noise_strength ignored" and name.endswith("noise_strength"):
                t.fill_(1.0)
            elif variant == "box resample filter" and name.endswith("resample_filter"):
                owner = model.get_submodule(name.rsplit(".", 1)[0])
                owner.resample_filter = torch.full((2, 2), 0.25)
    elif variant == "no demodulation":
        real = ops.modulated_conv
        monkeypatch.setattr(ops, "modulated_conv", lambda *a, **k: real(*a, **{**k, "demodulate": False}))
    elif variant == "demodulation eps 1e-1":
        monkeypatch.setattr(ops, "DEMOD_EPS", 1e-1)
    elif variant == "no sqrt(2) gain":
        for m in G.modules():
            if isinstance(m, sg.SynthesisLayer):
                monkeypatch.setattr(m, "act_gain", 1.0)
    elif variant == "conv0 nearest upsample":
        monkeypatch.setattr(ops, "conv_resample", _nearest_up_conv)
    elif variant == "ToRGB uses its own conv1 w":
        monkeypatch.setattr(sg.SynthesisNetwork, "_split_ws", _torgb_reads_own_conv1_row)
    elif variant == "fp16 top layers":
        kwargs = {"force_fp32": False}
    assert max_err(record(model, inputs["wplus"], "wplus", **kwargs), golden) > 1e-3


@pytest.mark.parametrize("variant", ["truncation on all ws", "no truncation", "z not normalised"])
def test_wrong_mapping_variants_fail(G, inputs, golden, monkeypatch, variant):
    with torch.no_grad():
        if variant == "truncation on all ws":
            err = (G.mapping(inputs["z"], truncation_psi=0.7) - golden["mapping.ws_trunc"]).abs().max()
        elif variant == "no truncation":
            err = (G.mapping(inputs["z"]) - golden["mapping.ws_trunc"]).abs().max()
        else:
            monkeypatch.setattr(ops, "normalize_2nd_moment", lambda x, eps=1e-8: x)
            err = (G.mapping(inputs["z"]) - golden["mapping.ws_psi1"]).abs().max()
    assert err > 1e-3


@pytest.mark.parametrize("variant", ["bilinear align_corners=True", "nearest", "conv inputs instead of outputs"])
def test_wrong_feature_variants_fail(G, inputs, variant):
    subset = load_file(str(FIXTURE / "features_subset.safetensors"))["wplus.features.sample0.every16"]
    with torch.no_grad():
        _, maps = G.synthesis(inputs["wplus"])
    if variant == "bilinear align_corners=True":
        ours = features(maps, 32, mode="bilinear", align_corners=True)
    elif variant == "nearest":
        ours = features(maps, 32, mode="nearest")
    else:  # README: each conv1's input (the const, or its block's conv0 output) instead of its output
        names = [f.name for f in G.feature_info]
        ours = features([maps[i - 1] if n.endswith("conv1") else maps[i] for i, n in enumerate(names)], 32)
    assert (ours[0, ::FEATURE_STEP] - subset).abs().max() > 1e-3


@pytest.mark.parametrize("force_fp32", [True, False])
def test_conv_clamp_bounds_every_layer_and_torgb(force_fp32):
    """The fixture cannot see the clamp (never reached there), so check it where it binds."""
    torch.manual_seed(0)
    kwargs = dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3)
    synthesis = {"channel_base": 128, "channel_max": 16, "num_fp16_res": 2}
    clamped = Generator(**kwargs, synthesis_kwargs={**synthesis, "conv_clamp": 0.05}).eval()
    free = Generator(**kwargs, synthesis_kwargs=synthesis).eval()
    free.load_state_dict(clamped.state_dict())
    ws = torch.randn(2, clamped.num_ws, 8)
    ours, theirs = (record(g, ws, "x", force_fp32=force_fp32) for g in (clamped, free))
    layers = [k for k in ours if k.endswith(("conv0", "conv1", "torgb"))]
    assert all(ours[k].abs().max() <= 0.05 for k in layers)
    assert all(theirs[k].abs().max() > 0.05 for k in layers)


# ---- C1 / C2: paper configurations on the meta device --------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS_256))
def test_paper_configurations_match_the_manifests(name):
    base, layers, entries, elements, channels = CONFIGS_256[name]
    with torch.device("meta"):
        G = Generator(z_dim=512, c_dim=0, w_dim=512, img_resolution=256, img_channels=3,
                      mapping_kwargs={"num_layers": layers},
                      synthesis_kwargs={"channel_base": base, "channel_max": 512, "num_fp16_res": 4, "conv_clamp": 256})
    manifest = json.loads((FIXTURE / "manifests" / f"stylegan2ada_G_ema_256_{name}.json").read_text())
    sd = G.state_dict()
    assert [[k, list(v.shape), str(v.dtype)[6:]] for k, v in sd.items()] == manifest
    assert (len(sd), sum(v.numel() for v in sd.values())) == (entries, elements)
    assert G.num_ws == 14
    assert [f.channels for f in G.feature_info] == channels and sum(channels) in (5888, 4992)
    with torch.no_grad():
        img, maps = G.synthesis(torch.empty(1, 14, 512, device="meta"))
    assert [tuple(m.shape[1:]) for m in maps] == [(f.channels, 256 // f.stride, 256 // f.stride) for f in G.feature_info]
    assert tuple(img.shape) == (1, 3, 256, 256)
    assert [f.name for f in G.feature_info][:3] == ["synthesis.b4.const", "synthesis.b4.conv1", "synthesis.b8.conv0"]


def test_unsupported_configurations_are_refused():
    base = dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3)
    for synthesis, match in [({"architecture": "resnet"}, "architecture 'resnet'"), ({"fused": 1}, "unknown.*fused"),
                             ({"activation": "relu"}, "activation 'relu'")]:
        with pytest.raises(BenchError, match=match):
            Generator(**base, synthesis_kwargs=synthesis)
    with pytest.raises(BenchError, match="mapping_kwargs: depth"):
        Generator(**base, mapping_kwargs={"depth": 2})
    with pytest.raises(BenchError, match="power of two"):
        Generator(**{**base, "img_resolution": 24})
    G = Generator(**base)
    with pytest.raises(BenchError, match=r"ws must have shape \[B, 4, 8\]"):
        G.synthesis(torch.zeros(1, 3, 8))
    with pytest.raises(BenchError, match="noise_mode"):
        G.synthesis(torch.zeros(1, 4, 8), noise_mode="constant")


def test_conditional_generator_runs():
    G = Generator(z_dim=8, c_dim=3, w_dim=8, img_resolution=8, img_channels=3, mapping_kwargs={"num_layers": 2}).eval()
    assert [k for k in G.state_dict() if k.startswith("mapping.")][:4] == [
        "mapping.w_avg", "mapping.embed.weight", "mapping.embed.bias", "mapping.fc0.weight"]
    assert G.mapping.fc0.weight.shape == (8, 16)
    with torch.no_grad():
        assert G(torch.randn(2, 8), torch.eye(3)[:2]).shape == (2, 3, 8, 8)
    with pytest.raises(BenchError, match="conditional"):
        G.mapping(torch.randn(2, 8))


# ---- C8 ----------------------------------------------------------------------------------------------

def test_two_runs_are_identical(G, inputs):
    first, second = (record(G, inputs["wplus"], "w") for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    _, sd1 = load_stylegan2_pkl(PKL)
    _, sd2 = load_stylegan2_pkl(PKL)
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert math.isfinite(first["w.image"].sum().item())
