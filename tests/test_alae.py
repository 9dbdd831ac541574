"""ALAE backbone: equivalence with activations recorded from the official code, the traps of its
sensitivity table, manifests (C1), feature dims (C2), safe loading (C3), containers (C6),
preprocessing (C7) and determinism (C8).

Fixture: tests/fixtures/alae (README there): the official code run on CPU at 32 px with a perturbed
random init, recorded noise, and its ``Checkpointer.save`` file.
"""
from __future__ import annotations

import collections
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import bench
from backbones import _alae_net
from backbones.alae import TINY_ARCH
from bench.errors import CheckpointError
from bench.features import sample_maps, upsample_concat
from helpers import WritesMarker

FIX = Path(__file__).parent / "fixtures" / "alae"
CHECKPOINT = FIX / "model_final.pth"
CHECKPOINT_SHA256 = "66eb63aa5659da96ac22d864acc5455e697f0f830447d842e079d26ac03e1776"
#: the fixture README's suggested tolerances (absolute)
TOL_MAPS = 5e-4  # decoder/encoder block maps and per-pixel features (values reach ~50)
TOL_VEC = 1e-4  # Z, styles, image
EMA = ("discriminator_s", "generator_s", "mapping_tl_s", "mapping_fl_s", "dlatent_avg")
LAYERS = 4


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    data = {**load_file(FIX / "inputs.safetensors"), **load_file(FIX / "activations.safetensors"),
            **load_file(FIX / "features_sample0.safetensors")}
    data["noise"] = [data[f"noise.decode_block.{i}.{j}"] for i in range(LAYERS) for j in (1, 2)]
    return data


def _backbone(**kwargs) -> bench.Backbone:
    return bench.create_backbone("alae", checkpoint=CHECKPOINT, **kwargs)


def _run(bb: bench.Backbone, x: torch.Tensor, noise, styles_fn=None) -> dict:
    """The demo's encode -> repeat -> decode -> to_rgb on the backbone's network, with ``noise``."""
    net = bb.model
    with torch.no_grad():
        z, enc = net.encode(x)
        styles = z.repeat(1, 2 * LAYERS, 1)
        if styles_fn is not None:
            styles = styles_fn(net, styles)
        dec = net.decode(styles, noise, LAYERS - 1)
        return {"Z": z, "styles": styles, "enc": enc, "dec": dec, "image": net.to_image(dec[-1], LAYERS - 1)}


def _errors(out: dict, ref: dict) -> dict[str, float]:
    def err(a, b):
        return (a - b).abs().max().item()

    return {
        "Z": err(out["Z"], ref["encoder.Z"]), "styles": err(out["styles"], ref["styles"]),
        "image": err(out["image"], ref["image"]),
        "encoder": max(err(m, ref[f"encoder.encode_block.{i}"]) for i, m in enumerate(out["enc"])),
        "decoder": max(err(m, ref[f"decoder.decode_block.{i}"]) for i, m in enumerate(out["dec"])),
    }


# ---- equivalence with the official code ---------------------------------------------------------------

def test_fixture_container_loads_with_the_architecture_read_from_its_shapes():
    bb = _backbone()
    meta = json.loads((FIX / "metadata.json").read_text())["constructor"]
    assert {k: getattr(bb.arch, k) for k in ("layer_count", "startf", "maxf", "latent_size", "mapping_layers",
                                              "channels")} == {k: meta[k] for k in ("layer_count", "startf", "maxf",
                                                               "latent_size", "mapping_layers", "channels")}
    assert bb.tag is None and bb.weights_sha256() == CHECKPOINT_SHA256 and bb.input_size == 32
    assert bb.num_features == 120 and [f.stride for f in bb.feature_info] == [8, 4, 2, 1]


def test_encoder_decoder_and_image_match_the_official_code(official):
    errors = _errors(_run(_backbone(), official["x"], official["noise"]), official)
    assert errors["Z"] < TOL_VEC and errors["styles"] < TOL_VEC and errors["image"] < TOL_VEC, errors
    assert errors["encoder"] < TOL_MAPS and errors["decoder"] < TOL_MAPS, errors


def test_forward_features_match_the_official_decoder_blocks_and_features(official):
    bb = _backbone()
    bb.noise = official["noise"]  # the recorded draws (per sample, as the official batch-2 call made them)
    maps = bb.forward_features(official["x"])
    for i, m in enumerate(maps):
        assert (m - official[f"decoder.decode_block.{i}"]).abs().max() < TOL_MAPS
    # The harness's per-pixel features (dense, and the sampler at every pixel) equal the official ones.
    ref = official["decoder_blocks.features.sample0"]
    assert (upsample_concat(maps, 32)[0] - ref).abs().max() < TOL_MAPS
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    sampled = sample_maps([m[0].permute(1, 2, 0) for m in maps], ys.flatten(), xs.flatten(), 32)
    assert (sampled.T.reshape(120, 32, 32) - ref).abs().max() < TOL_MAPS


def test_encoder_variant_matches_the_official_encode_blocks(official):
    maps = _backbone(source="encoder").forward_features(official["x"])
    assert [f.name for f in _backbone(source="encoder").feature_info] == [f"encode_block{i}" for i in range(4)]
    for i, m in enumerate(maps):
        assert (m - official[f"encoder.encode_block.{i}"]).abs().max() < TOL_MAPS
    assert (upsample_concat(maps, 32)[0] - official["encoder_blocks.features.sample0"]).abs().max() < TOL_MAPS


def test_seeded_noise_is_the_official_draw_of_torch_manual_seed(official):
    # Same seed as the recording (703): the first draw is the shared [1,1,4,4] map, the second the
    # first sample's [.,1,4,4] map; later draws differ only because the recording drew for 2 samples.
    noise = _alae_net.constant_noise(_backbone().arch, seed=703)
    assert torch.equal(noise[0], official["noise"][0]) and torch.equal(noise[1][0], official["noise"][1][0])


# ---- sensitivity table: each cheap wrong variant must fail the comparison -----------------------------

def _truncate(net, styles):
    """psi 0.7 on the first 8 style rows towards dlatent_avg (what the demo does NOT do)."""
    avg = net.dlatent_avg.buff[None]
    rows = (torch.arange(styles.shape[1]) < 8).view(1, -1, 1)
    return torch.where(rows, avg + 0.7 * (styles - avg), styles)


def test_each_sample_alone_stays_within_tolerance(official):
    bb = _backbone()
    for b in range(2):
        noise = [n[b:b + 1] if n.shape[0] == 2 else n for n in official["noise"]]
        out = _run(bb, official["x"][b:b + 1], noise)
        ref = {k: v[b:b + 1] for k, v in official.items() if isinstance(v, torch.Tensor) and v.dim() >= 3}
        errors = _errors(out, ref)
        assert errors["decoder"] < TOL_MAPS and errors["Z"] < TOL_VEC, errors


@pytest.mark.parametrize("variant, measure, tol", [
    ("single leaky ReLU after from_rgb", "Z", TOL_VEC),
    ("non-EMA groups", "decoder", TOL_MAPS),
    ("fresh noise (seeded, shared)", "decoder", TOL_MAPS),
    ("zero noise", "decoder", TOL_MAPS),
    ("decoder InstanceNorm eps 1e-5", "decoder", TOL_MAPS),
    ("decoder blur omitted", "decoder", TOL_MAPS),
    ("truncation psi 0.7", "image", TOL_VEC),
])
def test_wrong_variant_fails_the_comparison(official, monkeypatch, variant, measure, tol):
    bb, noise, styles_fn = _backbone(), official["noise"], None
    if variant == "single leaky ReLU after from_rgb":
        monkeypatch.setattr(_alae_net.FromRGB, "forward", lambda self, x: self.from_rgb(x))
    elif variant == "non-EMA groups":
        models = torch.load(CHECKPOINT, weights_only=True)["models"]  # fixture: empty auxiliary
        bb.model.load_state_dict({f"{g}.{k}": v for g in EMA for k, v in models[g.removesuffix("_s")].items()})
    elif variant == "fresh noise (seeded, shared)":
        noise = bb.noise
    elif variant == "zero noise":
        noise = [torch.zeros_like(n) for n in noise]
    elif variant == "decoder InstanceNorm eps 1e-5":
        monkeypatch.setattr(_alae_net, "DECODER_NORM_EPS", 1e-5)
    elif variant == "decoder blur omitted":
        for block in bb.model.generator_s.decode_block:
            block.blur = torch.nn.Identity()
    elif variant == "truncation psi 0.7":
        styles_fn = _truncate
    errors = _errors(_run(bb, official["x"], noise, styles_fn), official)
    assert errors[measure] > tol, (variant, errors)


@pytest.mark.parametrize("mode", ["bilinear, align_corners=True", "nearest"])
def test_wrong_feature_upsampling_fails(official, mode):
    bb = _backbone()
    bb.noise = official["noise"]
    maps = bb.forward_features(official["x"])
    kwargs = {"mode": "bilinear", "align_corners": True} if mode.startswith("bilinear") else {"mode": "nearest"}
    wrong = torch.cat([F.interpolate(m, size=(32, 32), **kwargs) for m in maps], dim=1)[0]
    assert (wrong - official["decoder_blocks.features.sample0"]).abs().max() > TOL_MAPS


# ---- the fused resampling path (128 px and up), which the 32 px fixture does not reach -----------------

def test_fused_convs_resample_exactly_like_the_unfused_path():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    down = _alae_net.DownConv(3, 5)
    down.weight.data.normal_()
    torch.testing.assert_close(down(x), F.avg_pool2d(F.conv2d(x, down.weight, padding=1), 2))
    up = _alae_net.UpConv(3, 5)  # weight [in, out, 3, 3]: a transposed conv flips the kernel
    up.weight.data.normal_()
    unfused = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.weight.transpose(0, 1).flip(2, 3),
                       padding=1)
    torch.testing.assert_close(up(x), unfused)


def test_an_unseen_configuration_at_128_px_loads_from_its_shapes(tmp_path):
    arch = _alae_net.ALAEArch(layer_count=6, startf=2, maxf=8, latent_size=4, mapping_layers=1, channels=3)
    net = _alae_net.ALAE(arch)
    assert isinstance(net.generator_s.decode_block[5].conv_1, _alae_net.UpConv)
    assert isinstance(net.discriminator_s.encode_block[0].conv_2, _alae_net.DownConv)
    groups = collections.defaultdict(collections.OrderedDict)
    for key, value in net.state_dict().items():
        group, _, param = key.partition(".")
        groups[group][param] = value + 0.1 * torch.randn_like(value)
    torch.save({"models": dict(groups), "auxiliary": {}, "iteration": 5}, tmp_path / "model_5.pth")
    bb = bench.create_backbone("alae", checkpoint=tmp_path / "model_5.pth", blocks=[1, 5])
    assert bb.arch == arch and bb.input_size == 128
    maps = bb.extract(torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8))
    assert [tuple(m.shape) for m in maps] == [(1, 8, 8, 8), (1, 2, 128, 128)]
    assert all(torch.isfinite(m).all() for m in maps)
    wrong = {"layer_count": 6, "startf": 4, "maxf": 8, "latent_size": 4, "mapping_layers": 1}  # an explicit arch wins
    with pytest.raises(CheckpointError, match=r"model_5\.pth does not fit the model: key 'discriminator_s\.from_rgb\.0"
                                              r"\.from_rgb\.weight' has shape \(2, 3, 1, 1\), expected \(4, 3, 1, 1\)"):
        bench.create_backbone("alae", checkpoint=tmp_path / "model_5.pth", arch=wrong)


# ---- C1 / C2: paper configurations on the meta device --------------------------------------------------

@pytest.mark.parametrize("tag, manifest, entries, elements", [
    ("lsun_bedroom", "alae_bedroom256", 191, 42_646_933), ("ffhq", "alae_ffhq1024", 239, 54_299_611)])
def test_paper_configurations_match_the_manifests(tag, manifest, entries, elements):
    bb = bench.create_backbone(f"alae.{tag}", pretrained=False, device="meta")
    state = bb.model.state_dict()
    expected = [tuple(e) for e in json.loads((FIX / f"{manifest}.json").read_text())]
    assert [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()] == [
        (k, s, d) for k, s, d in expected]
    assert len(state) == entries and sum(v.numel() for v in state.values()) == elements


@pytest.mark.parametrize("tag, config, total", [
    ("lsun_bedroom", "alae_bedroom256", {"decoder": 2016, "encoder": 2496}),
    ("ffhq", "alae_ffhq1024", {"decoder": 2544, "encoder": 3040})])
@pytest.mark.parametrize("source", ["decoder", "encoder"])
def test_feature_dims_on_meta_match_the_model_configs(tag, config, total, source):
    spec = json.loads((FIX / "alae_model_configs.json").read_text())[config]
    expected = ([e["shape"] for e in spec["decoder_block_outputs"]] if source == "decoder"
                else [e["output"] for e in spec["encoder_block_io"]])
    bb = bench.create_backbone(f"alae.{tag}", pretrained=False, device="meta", source=source)
    size = spec["input_resolution"]
    assert bb.input_size == size
    maps = bb.forward_features(torch.empty(1, 3, size, size, device="meta"))
    assert [list(m.shape[1:]) for m in maps] == expected
    assert [[f.channels, size // f.stride, size // f.stride] for f in bb.feature_info] == expected
    assert bb.num_features == total[source] == spec["per_pixel_dim"][f"{source} block outputs"]


# ---- C3 / C6: containers -------------------------------------------------------------------------------

def _training_container(monkeypatch, auxiliary_extra=None) -> tuple[dict, dict]:
    """A tiny model saved the way ALAE's Checkpointer saves a training run: EMA and raw groups, and an
    ``auxiliary`` with optimizer/scheduler states and tracker objects of a throw-away ``tracker`` module."""
    arch = _alae_net.ALAEArch(**{**TINY_ARCH, "maxf": 16})
    torch.manual_seed(1)
    ema = collections.defaultdict(collections.OrderedDict)
    for key, value in _alae_net.ALAE(arch).state_dict().items():
        group, _, param = key.partition(".")
        ema[group][param] = value + 0.1 * torch.randn_like(value)  # no constant tensors: a mix-up shows
    models = {**ema, **{g.removesuffix("_s"): {k: v + 1.0 for k, v in ema[g].items()} for g in EMA[:4]}}

    tracker = types.ModuleType("tracker")

    class RunningMean:
        def __init__(self):
            self._mean, self.n = 0.5, 3

    class RunningMeanTorch:
        def __init__(self):
            self.values = [torch.tensor(1.5), torch.tensor(2.5)]

    for cls in (RunningMean, RunningMeanTorch):
        cls.__module__, cls.__qualname__ = "tracker", cls.__name__
        setattr(tracker, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "tracker", tracker)
    auxiliary = {
        "encoder_optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                              "param_groups": [{"lr": 0.0015, "betas": (0.0, 0.99), "eps": 1e-8, "params": [0]}]},
        "scheduler": {"encoder_optimizer": {"milestones": [], "gamma": 0.1, "base_lrs": [0.0015], "last_epoch": 4}},
        "tracker": {"tracks": collections.OrderedDict(loss_d=RunningMeanTorch(), lod=RunningMean()),
                    "epochs": [1, 2], "means_over_epochs": collections.OrderedDict(loss_d=[0.1, 0.2])},
        **(auxiliary_extra or {}),
    }
    return {"models": models, "auxiliary": auxiliary, "iteration": 1234}, dict(ema)


def _save(container: dict, path: Path, monkeypatch, **kwargs) -> Path:
    torch.save(container, path, **kwargs)
    monkeypatch.delitem(sys.modules, "tracker")  # ALAE's classes are not importable when we load
    return path


def test_training_container_with_tracker_objects_loads_the_ema_groups(tmp_path, monkeypatch):
    container, ema = _training_container(monkeypatch)
    path = _save(container, tmp_path / "model_final.pth", monkeypatch)
    with pytest.raises(Exception):  # what the stock safe loader does with this file
        torch.load(path, weights_only=True)
    bb = bench.create_backbone("alae", checkpoint=path)
    assert bb.arch.layer_count == 3 and bb.weights_sha256()
    for key, value in bb.model.state_dict().items():
        group, _, param = key.partition(".")
        assert torch.equal(value, ema[group][param]), key


def test_a_deleted_key_or_group_is_named(tmp_path, monkeypatch):
    container, _ = _training_container(monkeypatch)
    del container["models"]["generator_s"]["decode_block.1.conv_2.weight"]
    path = _save(container, tmp_path / "cut.pth", monkeypatch)
    with pytest.raises(CheckpointError, match=r"cut\.pth does not fit the model: missing key "
                                              r"'generator_s\.decode_block\.1\.conv_2\.weight' \(expected shape "
                                              r"\(8, 8, 3, 3\)\)"):
        bench.create_backbone("alae", checkpoint=path)
    torch.save({"models": {"generator": {}}, "auxiliary": {}}, tmp_path / "raw.pth")
    with pytest.raises(CheckpointError, match=r"raw\.pth has no group 'discriminator_s'.*groups: 'generator'"):
        bench.create_backbone("alae", checkpoint=tmp_path / "raw.pth")


def test_flat_state_dicts_load_too(tmp_path, monkeypatch):
    from bench.checkpoints import save_safetensors

    _, ema = _training_container(monkeypatch)
    flat = {f"{g}.{k}": v for g in EMA for k, v in ema[g].items()}
    save_safetensors(flat, tmp_path / "alae.safetensors")
    # the official Model's own state_dict() names the groups encoder / decoder / mapping_tl / ...
    names = {"discriminator_s": "encoder", "generator_s": "decoder", "mapping_tl_s": "mapping_tl",
             "mapping_fl_s": "mapping_fl", "dlatent_avg": "dlatent_avg"}
    torch.save({f"{names[g]}.{k}": v for g in EMA for k, v in ema[g].items()}, tmp_path / "model.pt")
    for name in ("alae.safetensors", "model.pt"):
        bb = bench.create_backbone("alae", checkpoint=tmp_path / name)
        assert all(torch.equal(v, flat[k]) for k, v in bb.model.state_dict().items()), name


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("pretrained", [True, False])
def test_malicious_pickle_in_the_container_is_refused(tmp_path, monkeypatch, protocol, pretrained):
    probe = tmp_path / "probe_marker"
    container, _ = _training_container(monkeypatch, {"payload": WritesMarker(probe)})
    torch.save(container, tmp_path / "probe.pth", pickle_protocol=protocol)
    torch.load(tmp_path / "probe.pth", weights_only=False)  # the payload really runs on an unsafe load
    assert probe.exists()

    marker = tmp_path / "marker"
    container["auxiliary"]["payload"] = WritesMarker(marker)
    path = _save(container, tmp_path / "evil.pth", monkeypatch, pickle_protocol=protocol)
    # A random-init control reads the file for its architecture only: through the same safe reader.
    with pytest.raises(CheckpointError, match=r"evil\.pth refers to the Python global builtins\.exec.*nothing from "
                                              r"the file was executed"):
        bench.create_backbone("alae", checkpoint=path, pretrained=pretrained)
    assert not marker.exists()


def test_random_control_takes_only_the_architecture_from_the_file():
    bb = bench.create_backbone("alae", checkpoint=CHECKPOINT, pretrained=False)
    assert bb.arch.layer_count == 4 and bb.weights_sha256() == "" and "weights_sha256" in bb.config()
    assert torch.equal(bb.model.generator_s.const, torch.ones(1, 64, 4, 4))  # the official init, not the file


# ---- C7 / C8, table, options ---------------------------------------------------------------------------

def test_preprocess_maps_0_and_255_to_minus_one_and_one_and_resizes():
    bb = bench.create_backbone("alae", **bench.get_backbone_class("alae").tiny)
    images = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    images[:, 1] = 255
    x = bb.preprocess(images)
    assert x[:, 0].eq(-1).all() and x[:, 1].eq(1).all() and x.dtype == torch.float32
    small = bb.preprocess(torch.full((2, 3, 8, 8), 255, dtype=torch.uint8))  # e.g. FFHQ-34 256 px -> 1024
    assert tuple(small.shape) == (2, 3, 16, 16) and small.eq(1).all()
    with pytest.raises(bench.BenchError, match="uint8"):
        bb.preprocess(images.float())
    with pytest.raises(bench.BenchError, match=r"\[B, 3, 16, 16\]"):
        bb.forward_features(torch.zeros(1, 3, 8, 8))


def test_seeded_features_are_deterministic_and_batch_independent(official):
    x = official["x"]
    first, again = _backbone(seed=5).forward_features(x), _backbone(seed=5).forward_features(x)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    alone = _backbone(seed=5).forward_features(x[1:])
    assert all((a[1:] - b).abs().max() < TOL_MAPS for a, b in zip(first, alone))
    other = _backbone(seed=6).forward_features(x)
    assert (other[-1] - first[-1]).abs().max() > TOL_MAPS
    assert _backbone(seed=5).config()["seed"] == 5


def test_weights_table_declares_the_official_checkpoints_only():
    cls = bench.get_backbone_class("alae")
    assert set(cls.weights) == {"lsun_bedroom", "ffhq"}
    bedroom, ffhq = cls.weights["lsun_bedroom"], cls.weights["ffhq"]
    assert bedroom.url == ("https://alaeweights.s3.us-east-2.amazonaws.com/bedroom/model_final.pth",)
    assert ffhq.url == ("https://alaeweights.s3.us-east-2.amazonaws.com/ffhq/model_157.pth",)
    assert bedroom.license.startswith("Apache-2.0") and ffhq.license.startswith("Apache-2.0")
    assert dict(bedroom.paper_miou) == {"bedroom_28": (20.0, 1.0), "ade_bedroom_30": (15.0, 0.5)}
    assert dict(ffhq.paper_miou) == {"ffhq_34": (48.1, 1.3), "celeba_19": (49.7, 0.7)}
    assert "no official ALAE checkpoint for LSUN cat or horse" in sys.modules[cls.__module__].__doc__
    with pytest.raises(bench.BenchError, match="has no weights tag 'lsun_cat'; known tags: lsun_bedroom, ffhq"):
        bench.create_backbone("alae.lsun_cat", pretrained=False, device="meta")


@pytest.mark.parametrize("kwargs, message", [
    ({"blocks": [3]}, "block 3 is out of range; valid blocks are 0..2"),
    ({"source": "mapping"}, "source must be one of"),
    ({"arch": {"layer_count": 3}}, "needs 'startf'"),
    ({"arch": {**TINY_ARCH, "width": 3}}, "unknown key 'width'"),
    ({"arch": {**TINY_ARCH, "startf": 0}}, "startf must be a positive integer"),
    ({"arch": {**TINY_ARCH, "generator": "GeneratorStyleGAN"}}, "only 'GeneratorDefault'"),
])
def test_invalid_options_are_errors(kwargs, message):
    with pytest.raises(bench.BenchError, match=message):
        bench.create_backbone("alae", **{**bench.get_backbone_class("alae").tiny, **kwargs})
