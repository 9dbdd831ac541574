"""e4e / pSp backbones (``gan_encoder``, ``gan_inversion``): golden values of the official code, manifests,
container safety and round trip, preprocessing, determinism (spec 2.2, C1-C3, C6-C8).

The golden fixture (tests/fixtures/e4e, README there) was made by the official encoder4editing code on a
32 px configuration (full IR-SE50 encoder with 512-channel heads, rosinality Generator(32)); its weights
are rebuilt here from their exact integer recipe, written as the official container and loaded by our
loader, as a user's file would be.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import bench
import backbones._e4e_encoder as e4e_encoder
from backbones._e4e_common import TINY_ARCH
from bench.errors import CheckpointError
from bench.features import sample_maps
from bench.hub import sha256_file
from helpers import WritesMarker

FIXTURE = Path(__file__).parent / "fixtures" / "e4e"
TOL = 1e-4  # the fixture README's absolute tolerance
GOLDEN_SIZE = 32  # the fixture ran the encoder at 32 px without the 256 resize


def _decode_weights() -> OrderedDict:
    """The fixture's state dict from weights_encoding.json (README recipe), each tensor checked by sha256.

    splitmix64 on uint64 arrays (arithmetic modulo 2**64 is the recipe), in chunks with reused buffers:
    fresh 100 MB temporaries per operation would cost more in page faults than in arithmetic.
    """
    spec = json.loads((FIXTURE / "weights_encoding.json").read_text())
    m1, m2, m3 = (np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
    chunk = 1 << 16
    counter = np.arange(1, chunk + 1, dtype=np.uint64)
    z, tmp = np.empty(chunk, np.uint64), np.empty(chunk, np.uint64)
    state = OrderedDict()
    for entry in spec["tensors"]:
        if entry["encoding"] == "literal":
            state[entry["key"]] = torch.tensor(entry["value"], dtype=torch.int64)
            continue
        n = int(np.prod(entry["shape"], dtype=np.int64))
        value = np.empty(n, np.float32)
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            zz, tt = z[:k], tmp[:k]
            np.add(counter[:k], np.uint64((entry["index"] << 32) + start), out=zz)  # s = (j << 32) + i + 1
            with np.errstate(over="ignore"):
                for mult, shift in ((m1, 30), (m2, 27), (m3, 31)):
                    np.multiply(zz, mult, out=zz)
                    np.bitwise_xor(zz, np.right_shift(zz, np.uint64(shift), out=tt), out=zz)
            # z mod 255 = (high + low 32 bits) mod 255, as 2**32 = 1 (mod 255); the sum fits in 33 bits.
            np.bitwise_and(zz, np.uint64(0xFFFFFFFF), out=tt)
            np.add(np.right_shift(zz, np.uint64(32), out=zz), tt, out=zz)
            value[start:start + k] = np.remainder(zz, np.uint64(255), out=zz)
        value -= 127  # code in [-127, 127]; code * 2**k is exact, so one rounding at the offset
        value *= np.float32(2.0 ** entry["scale_log2"])
        value += np.float32(entry["offset"])
        assert hashlib.sha256(value.astype("<f4").tobytes()).hexdigest() == entry["sha256_f32_le"], entry["key"]
        state[entry["key"]] = torch.from_numpy(value).reshape(entry["shape"])
    return state


@pytest.fixture(scope="module")
def official_file(tmp_path_factory) -> Path:
    """The official container of the fixture: torch.save({'state_dict', 'opts', 'latent_avg'})."""
    spec = json.loads((FIXTURE / "weights_encoding.json").read_text())
    path = tmp_path_factory.mktemp("e4e") / "fixture_e4e.pt"
    torch.save({"state_dict": _decode_weights(), "opts": spec["opts"],
                "latent_avg": load_file(str(FIXTURE / "latent_avg.safetensors"))["latent_avg"]}, path)
    return path


@pytest.fixture(scope="module")
def golden() -> dict:
    return {"x": load_file(str(FIXTURE / "inputs.safetensors"))["x"],
            "acts": load_file(str(FIXTURE / "activations_reduced.safetensors")),
            "features": load_file(str(FIXTURE / "features_reduced.safetensors"))}


@pytest.fixture(scope="module")
def inversion(official_file):
    return bench.create_backbone("gan_inversion", checkpoint=official_file, arch={"encoder_size": GOLDEN_SIZE})


def _encoder_plugin(inversion, layers: str = "body"):
    """A ``gan_encoder`` of the fixture's architecture sharing the loaded encoder (one 578 MB load, not
    three: loading ``gan_encoder`` from a container is tested on a tiny file in test_e4e_loading.py)."""
    bb = bench.create_backbone("gan_encoder", pretrained=False, device="meta", layers=layers,
                               arch={**inversion.arch, "encoder_size": GOLDEN_SIZE})
    bb.encoder, bb.device = inversion.encoder, "cpu"
    return bb


@pytest.fixture(scope="module")
def encoder_bb(inversion):
    return _encoder_plugin(inversion)


def _forward(bb, x: torch.Tensor) -> dict:
    """Everything the fixture records, from our modules: encoder activations, codes, decoder maps, images."""
    with torch.no_grad():
        out = bb.encoder(x, heads=True)
        codes = out["codes_raw"] + bb.latent_avg
        record: dict = {}
        image, maps = bb.decoder(codes, record=record)
    acts = {"encoder.input_layer": out["input_layer"], "encoder.latlayer1": out["latlayer1"],
            "encoder.latlayer2": out["latlayer2"], "encoder.codes_raw": out["codes_raw"], "codes_wplus": codes,
            "decoder.image": image, **{f"decoder.{k}": v for k, v in record.items()}}
    acts.update({f"encoder.body.{i}": m for i, m in enumerate(out["body"])})
    acts.update({f"encoder.styles.{i}": s for i, s in enumerate(out["styles"])})
    names = ["decoder.input", "decoder.conv1"] + [f"decoder.convs.{k}" for k in range(len(maps) - 2)]
    acts.update(dict(zip(names, maps)))
    return acts


@pytest.fixture(scope="module")
def ours(inversion, golden) -> dict:
    return _forward(inversion, golden["x"])


def _max_err(ours: dict, golden: dict, key: str) -> tuple[float, float]:
    """(max abs error, max abs error / max |golden|) of one recorded tensor; thinned maps at their channels."""
    acts = golden["acts"]
    if key in acts:
        got, want = ours[key], acts[key]
    else:
        got, want = ours[key][:, acts["thinned_channel_index"]], acts[f"{key}.every8th_channel"]
    assert got.shape == want.shape, key
    err = (got - want).abs().max().item()
    return err, err / want.abs().max().item()


ENCODER_KEYS = (["encoder.input_layer"] + [f"encoder.body.{i}" for i in range(24)]
                + ["encoder.latlayer1", "encoder.latlayer2"] + [f"encoder.styles.{i}" for i in range(8)]
                + ["encoder.codes_raw", "codes_wplus"])
DECODER_KEYS = (["decoder.input", "decoder.conv1"] + [f"decoder.convs.{k}" for k in range(6)]
                + ["decoder.to_rgb1"] + [f"decoder.to_rgbs.{k}" for k in range(3)] + ["decoder.image"])


def test_fixture_configuration_is_read_from_the_container(inversion, official_file):
    assert inversion.arch["size"] == 32 and inversion.n_styles == 8
    assert inversion.arch["encoder_type"] == "Encoder4Editing" and inversion.arch["start_from_latent_avg"]
    assert inversion.tag is None and inversion.weights_sha256() == sha256_file(official_file)
    assert inversion.encoder.taps == (6, 20, 23) and len(inversion.encoder.styles) == 8


@pytest.mark.parametrize("key", ENCODER_KEYS)
def test_encoder_activations_and_codes_match_official(ours, golden, key):
    err, _ = _max_err(ours, golden, key)
    assert err <= TOL, f"{key}: max abs error {err:.3g}"


@pytest.mark.parametrize("key", DECODER_KEYS)
def test_decoder_maps_and_image_match_official(ours, golden, key):
    err, _ = _max_err(ours, golden, key)
    assert err <= TOL, f"{key}: max abs error {err:.3g}"


def _pixel_features(maps: list[torch.Tensor], pixels: torch.Tensor, sample: int) -> torch.Tensor:
    """The harness's pixel sampler (bilinear, align_corners=False) at flattened pixels y * 32 + x."""
    channels_last = [m[sample].permute(1, 2, 0) for m in maps]
    return sample_maps(channels_last, pixels // GOLDEN_SIZE, pixels % GOLDEN_SIZE, GOLDEN_SIZE)


@pytest.fixture(scope="module")
def plugin_maps(inversion, encoder_bb, golden) -> dict:
    with torch.inference_mode():
        return {"gan_encoder": encoder_bb.forward_features(golden["x"]),
                "gan_inversion": inversion.forward_features(golden["x"])}


@pytest.mark.parametrize("name", ["gan_encoder", "gan_inversion"])
def test_pixel_features_match_official(plugin_maps, golden, name):
    pixels = golden["features"]["pixel_index"]
    for sample in (0, 1):
        want = golden["features"][f"{name}.features.sample{sample}"]
        got = _pixel_features(plugin_maps[name], pixels, sample)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= TOL


def test_fpn_feature_set_equals_the_recorded_pyramid(inversion, golden):
    bb = _encoder_plugin(inversion, layers="fpn")
    assert [f.channels for f in bb.feature_info] == [128, 256, 512, 512, 512]
    c1, c2, c3, p2, p1 = bb.forward_features(golden["x"])
    acts = golden["acts"]
    for got, key in ((c1, "encoder.body.6"), (c2, "encoder.body.20"), (c3, "encoder.body.23")):
        assert (got - acts[key]).abs().max().item() <= TOL
    # p2 and p1 from the recorded c3 / lateral maps by the official rule (bilinear, align_corners=True).
    up = dict(mode="bilinear", align_corners=True)
    want_p2 = F.interpolate(acts["encoder.body.23"], size=(4, 4), **up) + acts["encoder.latlayer1"]
    want_p1 = F.interpolate(want_p2, size=(8, 8), **up) + acts["encoder.latlayer2"]
    assert (p2 - want_p2).abs().max().item() <= TOL and (p1 - want_p1).abs().max().item() <= TOL


def test_each_sample_alone_gives_the_same_codes(inversion, golden):
    with torch.no_grad():
        alone = torch.cat([inversion.codes(golden["x"][i:i + 1]) for i in range(2)])
    assert (alone - golden["acts"]["codes_wplus"]).abs().max().item() <= TOL


# ---- sensitivity: each wrong variant of the README's table must fail the comparison -----------------


@contextlib.contextmanager
def _restored(tensors):
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)


def _codes_error(bb, golden) -> float:
    with torch.no_grad():
        return (bb.codes(golden["x"]) - golden["acts"]["codes_wplus"]).abs().max().item()


def test_variant_encoder_batchnorm_in_train_mode_fails(inversion, golden):
    bns = [m for m in inversion.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with _restored([t for m in bns for t in (m.running_mean, m.running_var, m.num_batches_tracked)]):
        inversion.encoder.train()
        try:
            err = _codes_error(inversion, golden)
        finally:
            inversion.encoder.eval()
    assert err > TOL


@pytest.mark.parametrize("upsample", [{"mode": "bilinear", "align_corners": False}, {"mode": "nearest"}])
def test_variant_fpn_upsampling_fails(inversion, golden, monkeypatch, upsample):
    monkeypatch.setattr(e4e_encoder, "FPN_UPSAMPLE", upsample)
    assert _codes_error(inversion, golden) > TOL


def test_variant_shared_prelu_slope_fails(inversion, golden):
    slopes = [m.weight for m in inversion.encoder.modules() if isinstance(m, torch.nn.PReLU)]
    with _restored(slopes):
        with torch.no_grad():
            for w in slopes:
                w.fill_(w.mean().item())
        err = _codes_error(inversion, golden)
    assert err > TOL


def test_variant_head_leaky_slope_0_2_fails(inversion, golden):
    acts = [m for m in inversion.encoder.styles.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert acts and all(m.negative_slope == 0.01 for m in acts)
    try:
        for m in acts:
            m.negative_slope = 0.2
        err = _codes_error(inversion, golden)
    finally:
        for m in acts:
            m.negative_slope = 0.01
    assert err > TOL


def test_variant_no_deltas_fails(inversion, golden):
    with torch.no_grad():
        head0 = inversion.encoder(golden["x"], heads=True)["styles"][0]
    codes = head0.unsqueeze(1).expand(-1, inversion.n_styles, -1) + inversion.latent_avg
    assert (codes - golden["acts"]["codes_wplus"]).abs().max().item() > TOL


def test_variant_latent_avg_not_added_fails(inversion, golden):
    with _restored([inversion.latent_avg]):
        inversion.latent_avg.zero_()
        with torch.no_grad():
            codes = inversion.codes(golden["x"])
            image, _ = inversion.decoder(codes)
    assert (codes - golden["acts"]["codes_wplus"]).abs().max().item() > TOL
    assert (image - golden["acts"]["decoder.image"]).abs().max().item() > TOL


def test_variant_fresh_noise_instead_of_stored_fails(inversion, ours, golden):
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(n.shape, generator=generator) for n in inversion.decoder.stored_noise()]
    with torch.no_grad():
        image, _ = inversion.decoder(ours["codes_wplus"], noise=noise)
    assert (image - golden["acts"]["decoder.image"]).abs().max().item() > TOL


@pytest.mark.parametrize("resample", [{"mode": "bilinear", "align_corners": True}, {"mode": "nearest"}])
def test_variant_feature_resampling_fails(plugin_maps, golden, resample):
    pixels = golden["features"]["pixel_index"]
    for name, maps in plugin_maps.items():
        dense = torch.cat([F.interpolate(m[:1], size=(GOLDEN_SIZE, GOLDEN_SIZE), **resample) for m in maps], 1)
        got = dense[0].flatten(1).T[pixels]
        assert (got - golden["features"][f"{name}.features.sample0"]).abs().max().item() > TOL


def test_two_runs_are_identical(inversion, golden):
    images = ((golden["x"][:1] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    first, second = inversion.extract(images), inversion.extract(images)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
