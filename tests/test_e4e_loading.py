"""e4e plugins: full-size architecture vs the manifest (C1), feature dims on meta (C2), malicious pickles
(C3), container round trip and strict errors (C6), preprocessing (C7), weights table and settings."""
from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import bench
from backbones._e4e_common import TINY_ARCH
from bench.errors import CheckpointError
from bench.hub import sha256_file
from helpers import WritesMarker

FIXTURE = Path(__file__).parent / "fixtures" / "e4e"
TINY_OPTS = {"exp_dir": "x", "encoder_type": "Encoder4Editing", "stylegan_size": 32, "start_from_latent_avg": True,
             "learning_rate": 1e-4, "stylegan_weights": "pretrained_models/stylegan2.pt", "progressive_steps": None}
TINY_NO_SIZE = {k: v for k, v in TINY_ARCH.items() if k != "size"}


def _manifest() -> list[list]:
    return json.loads((FIXTURE / "e4e_psp_stylegan2_256.json").read_text())


def _config() -> dict:
    return json.loads((FIXTURE / "e4e_model_config.json").read_text())["e4e_psp_stylegan2_256"]


def _state(bb) -> "OrderedDict[str, torch.Tensor]":
    out = OrderedDict((f"encoder.{k}", v) for k, v in bb.encoder.state_dict().items())
    out.update((f"decoder.{k}", v) for k, v in bb.decoder.state_dict().items())
    return out


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    bb = bench.create_backbone("gan_inversion", pretrained=False, arch=TINY_ARCH)
    with torch.no_grad():  # BN statistics and noise strengths start at constants: randomise so mix-ups show
        for name, t in _state(bb).items():
            if t.is_floating_point() and ("running" in name or "noise.weight" in name or "bias" in name):
                t.add_(torch.rand_like(t) * 0.5)
    bb.latent_avg = torch.randn(bb.n_styles, TINY_ARCH["style_dim"])
    return bb


def _save(path: Path, model, *, drop: str | None = None, extra: dict | None = None, opts: dict | None = None,
          latent_avg="keep", **top) -> Path:
    """The official container of ``model`` (pSp.save layout, plus training entries) with optional damage."""
    state = _state(model)
    if drop is not None:
        del state[drop]
    state.update(extra or {})
    content = {"state_dict": state, "opts": dict(TINY_OPTS) if opts is None else opts, "global_step": 1000,
               "best_val_loss": 0.5, **top}
    if latent_avg is not None:
        content["latent_avg"] = model.latent_avg if isinstance(latent_avg, str) else latent_avg
    torch.save(content, path)
    return path


# ---- C1 / C2: full-size configurations on the meta device --------------------------------------------


def test_full_size_state_dict_equals_the_manifest():
    bb = bench.create_backbone("gan_inversion.lsun_horse", pretrained=False, device="meta")
    got = [[k, list(v.shape), str(v.dtype)[len("torch."):]] for k, v in _state(bb).items()]
    assert got == _manifest()
    encoder = [e for e in got if e[0].startswith("encoder.")]
    assert (len(got), sum(torch.Size(s).numel() for _, s, _ in got)) == (700, 239_684_326)
    assert (len(encoder), sum(torch.Size(s).numel() for _, s, _ in encoder)) == (565, 209_475_060)


def test_gan_encoder_feature_dims_on_meta():
    config = _config()
    x = torch.empty(1, 3, 256, 256, device="meta")
    bb = bench.create_backbone("gan_encoder", pretrained=False, device="meta")
    body = [a for a in config["encoder_activations_256"] if a["module"].startswith("encoder.body.")]
    maps = bb.forward_features(x)
    assert [list(m.shape[1:]) for m in maps] == [a["shape"] for a in body]
    assert [f.name for f in bb.feature_info] == [a["module"][len("encoder."):] for a in body]
    assert [(f.channels, 256 // f.stride) for f in bb.feature_info] == [tuple(a["shape"][:2]) for a in body]
    assert bb.num_features == config["per_pixel_dim"]["all 24 body block outputs"] == 5824

    fpn = bench.create_backbone("gan_encoder", pretrained=False, device="meta", layers="fpn")
    assert [list(m.shape[1:]) for m in fpn.forward_features(x)] == list(config["fpn_maps"].values())
    assert fpn.num_features == config["per_pixel_dim"]["c1+c2+c3+p2+p1"] == 1920


def test_gan_inversion_feature_dims_on_meta():
    x = torch.empty(1, 3, 256, 256, device="meta")
    horse = bench.create_backbone("gan_inversion.lsun_horse", pretrained=False, device="meta")
    maps = horse.forward_features(x)
    expected = [(512, 4)] * 2 + [(512, 8)] * 2 + [(512, 16)] * 2 + [(512, 32)] * 2 + [(512, 64)] * 2 + \
        [(256, 128)] * 2 + [(128, 256)] * 2  # const + 13 convs, as stylegan2-ada config-f at 256
    assert [(m.shape[1], m.shape[-1]) for m in maps] == expected
    assert [(f.channels, 256 // f.stride) for f in horse.feature_info] == expected
    assert horse.num_features == _config()["per_pixel_dim"][
        "decoder (rosinality) const + conv1 + 12 convs (same as StyleGAN2 config-f rule)"] == 5888
    with torch.no_grad():
        assert horse.codes(x).shape == (1, 14, 512)

    ffhq = bench.create_backbone("gan_inversion.ffhq", pretrained=False, device="meta")
    maps = ffhq.forward_features(x)  # the encoder sees 256 px; the generator runs at 1024
    assert ffhq.n_styles == 18 and ffhq.num_features == 6080 and ffhq.input_size == 1024
    assert [(m.shape[1], m.shape[-1]) for m in maps][-4:] == [(64, 512), (64, 512), (32, 1024), (32, 1024)]
    assert bench.create_backbone("gan_inversion.lsun_horse", pretrained=False, device="meta",
                                 layers="convs").num_features == 5376


# ---- C6: container round trip, strict errors ------------------------------------------------------------


def test_official_container_round_trip(tmp_path, tiny_model):
    path = _save(tmp_path / "e4e_tiny.pt", tiny_model, optimizer={"state": {}, "param_groups": [{"lr": 1e-4}]})
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    loaded = bench.create_backbone("gan_inversion", checkpoint=path, arch=TINY_NO_SIZE)
    assert loaded.arch["size"] == 32 and loaded.tag is None and loaded.weights_sha256() == sha256_file(path)
    torch.testing.assert_close(loaded.latent_avg, tiny_model.latent_avg, rtol=0, atol=0)
    for got, want in zip(loaded.extract(images), tiny_model.extract(images)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    encoder = bench.create_backbone("gan_encoder", checkpoint=path, arch=TINY_NO_SIZE)
    assert encoder.decoder is None
    with torch.no_grad():
        want = tiny_model.encoder(tiny_model.preprocess(images))["body"]
    for got, ref in zip(encoder.extract(images), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_official_tag_with_a_local_file_keeps_the_tag(tmp_path, tiny_model):
    path = _save(tmp_path / "horse.pt", tiny_model)
    bb = bench.create_backbone("gan_encoder.lsun_horse", checkpoint=path, arch=TINY_NO_SIZE)
    assert bb.tag == "lsun_horse" and bb.weights_entry.paper_miou == {"horse_21": (26.7, 0.7)}


@pytest.mark.parametrize("name", ["gan_encoder", "gan_inversion"])
@pytest.mark.parametrize("key, shape", [("encoder.body.2.res_layer.1.weight", "(32, 16, 3, 3)"),
                                        ("decoder.convs.3.conv.weight", "(1, 16, 16, 3, 3)")])
def test_a_deleted_key_is_named_with_its_shape(tmp_path, tiny_model, name, key, shape):
    path = _save(tmp_path / "cut.pt", tiny_model, drop=key)
    with pytest.raises(CheckpointError, match=rf"cut\.pt does not fit the model: missing key '{key}' "
                                              rf"\(expected shape {shape.replace('(', '[(]').replace(')', '[)]')}\)"):
        bench.create_backbone(name, checkpoint=path, arch=TINY_NO_SIZE)


def test_other_mismatches_are_errors(tmp_path, tiny_model):
    extra = _save(tmp_path / "extra.pt", tiny_model, extra={"discriminator.fc.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'discriminator\.fc\.weight' \(shape \(2, 2\)\)"):
        bench.create_backbone("gan_inversion", checkpoint=extra, arch=TINY_NO_SIZE)
    wrong = _save(tmp_path / "wrong.pt", tiny_model, extra={"encoder.latlayer1.bias": torch.zeros(7)})
    with pytest.raises(CheckpointError, match=r"'encoder\.latlayer1\.bias' has shape \(7,\), expected \(32,\)"):
        bench.create_backbone("gan_inversion", checkpoint=wrong, arch=TINY_NO_SIZE)
    no_avg = _save(tmp_path / "no_avg.pt", tiny_model, latent_avg=None)
    with pytest.raises(CheckpointError, match=r"no_avg\.pt has no 'latent_avg'"):
        bench.create_backbone("gan_inversion", checkpoint=no_avg, arch=TINY_NO_SIZE)
    bad_avg = _save(tmp_path / "bad_avg.pt", tiny_model, latent_avg=torch.zeros(3, 16))
    with pytest.raises(CheckpointError, match=r"'latent_avg' .* has shape \(3, 16\), expected \(8, 16\)"):
        bench.create_backbone("gan_inversion", checkpoint=bad_avg, arch=TINY_NO_SIZE)
    with pytest.raises(bench.BenchError, match=r"arch size=64 contradicts checkpoint .*extra\.pt, which stores 32"):
        bench.create_backbone("gan_inversion", checkpoint=extra, arch={**TINY_ARCH, "size": 64})
    # The tiny file against the official architecture: the first missing key, with both shapes.
    path = _save(tmp_path / "tiny.pt", tiny_model)
    with pytest.raises(CheckpointError, match=r"tiny\.pt does not fit the model: missing key "
                                              r"'encoder\.body\.3\.shortcut_layer\.0\.weight' \(expected shape \(128, 64, 1, 1\)\)"):
        bench.create_backbone("gan_inversion", checkpoint=path)
    not_container = tmp_path / "list.pt"
    torch.save([1, 2], not_container)
    with pytest.raises(CheckpointError, match=r"list\.pt holds a list, not an e4e/pSp container"):
        bench.create_backbone("gan_inversion", checkpoint=not_container, arch=TINY_NO_SIZE)


def test_architecture_without_opts_comes_from_the_tensors(tmp_path, tiny_model):
    path = _save(tmp_path / "bare.pt", tiny_model, opts={})
    bb = bench.create_backbone("gan_inversion", checkpoint=path, arch=TINY_NO_SIZE)
    assert bb.arch["size"] == 32 and bb.arch["start_from_latent_avg"] and bb.arch["encoder_type"] == "Encoder4Editing"


def test_psp_opts_name_the_size_output_size(tmp_path, tiny_model):
    opts = {"output_size": 32, "encoder_type": "GradualStyleEncoder", "start_from_latent_avg": True, "input_nc": 3,
            "n_styles": 8}
    bb = bench.create_backbone("gan_inversion", checkpoint=_save(tmp_path / "psp.pt", tiny_model, opts=opts),
                               arch=TINY_NO_SIZE)
    assert bb.arch["size"] == 32 and bb.arch["encoder_type"] == "GradualStyleEncoder"
    sketch = _save(tmp_path / "sketch.pt", tiny_model, opts={**opts, "input_nc": 1})
    with pytest.raises(CheckpointError, match=r"sketch\.pt encodes 1-channel inputs"):
        bench.create_backbone("gan_inversion", checkpoint=sketch, arch=TINY_NO_SIZE)


def test_random_init_control_reads_only_the_architecture(tmp_path, tiny_model):
    path = _save(tmp_path / "arch_only.pt", tiny_model, opts={**TINY_OPTS, "stylegan_size": 32})
    bb = bench.create_backbone("gan_inversion", pretrained=False, checkpoint=path, arch=TINY_NO_SIZE)
    assert bb.arch["size"] == 32 and bb.weights_sha256() == ""
    assert not torch.equal(bb.decoder.input.input, tiny_model.decoder.input.input)
    assert torch.count_nonzero(bb.latent_avg) == 0


# ---- C3: malicious pickles ------------------------------------------------------------------------------


def _handcrafted(opcode: str, code: str) -> bytes:
    """A pickle that calls builtins.exec(code) through the given opcode (what an unsafe load would run)."""
    literal = b"S" + repr(code).encode() + b"\n"
    if opcode == "INST":
        return b"(" + literal + b"ibuiltins\nexec\n."
    if opcode == "OBJ":
        return b"(cbuiltins\nexec\n" + literal + b"o."
    protocol = {"GLOBAL0": 0, "GLOBAL2": 2, "STACK_GLOBAL4": 4, "STACK_GLOBAL5": 5}[opcode]
    return pickle.dumps({"state_dict": {}, "opts": WritesMarker(Path(code))}, protocol=protocol)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("opcode", ["GLOBAL0", "GLOBAL2", "STACK_GLOBAL4", "STACK_GLOBAL5", "INST", "OBJ"])
def test_handcrafted_malicious_pickles_are_refused(tmp_path, opcode):
    def payload(marker: Path) -> bytes:
        code = f"open({str(marker)!r}, 'w').write('pwned')"
        return _handcrafted(opcode, str(marker) if opcode.startswith(("GLOBAL", "STACK")) else code)

    probe, marker = tmp_path / "probe", tmp_path / "marker"
    pickle.loads(payload(probe))  # the payload really runs when unpickled
    assert probe.exists()
    (tmp_path / "evil.pt").write_bytes(payload(marker))
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        bench.create_backbone("gan_inversion", checkpoint=tmp_path / "evil.pt", arch=TINY_NO_SIZE)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", ["gan_encoder", "gan_inversion"])
@pytest.mark.parametrize("where", ["opts", "latent_avg", "state_dict"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_malicious_object_in_the_container_is_refused(tmp_path, tiny_model, name, where, protocol):
    marker = tmp_path / "marker"
    content = {"state_dict": _state(tiny_model), "opts": dict(TINY_OPTS), "latent_avg": tiny_model.latent_avg}
    if where == "state_dict":
        content["state_dict"]["encoder.evil"] = WritesMarker(marker)
    else:
        content[where] = WritesMarker(marker)
    torch.save(content, tmp_path / "evil.pt", pickle_protocol=protocol)
    for pretrained in (True, False):  # a random-init control reads the file too (for its architecture)
        # Protocol 2 is refused at the global (named); protocol 5 already at its FRAME opcode.
        with pytest.raises(CheckpointError, match=r"evil\.pt was refused: it contains "
                                                  + (r"the Python global (builtins\.)?exec" if protocol == 2 else "pickle")
                                                  + r".*nothing from the file was executed"):
            bench.create_backbone(name, pretrained=pretrained, checkpoint=tmp_path / "evil.pt", arch=TINY_NO_SIZE)
    assert not marker.exists()


# ---- C7, weights table, settings ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gan_encoder", "gan_inversion"])
def test_preprocess_maps_0_to_minus_1_and_255_to_1_at_the_encoder_size(name):
    bb = bench.create_backbone(name, pretrained=False, arch=TINY_ARCH)
    images = torch.zeros(2, 3, 64, 48, dtype=torch.uint8)
    images[1] = 255
    x = bb.preprocess(images)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x[0].unique().tolist() == [-1.0] and x[1].unique().tolist() == [1.0]
    with pytest.raises(bench.BenchError, match="uint8"):
        bb.preprocess(images.float())
    with pytest.raises(bench.BenchError, match=r"expects inputs of shape \[B, 3, 32, 32\]"):
        bb.forward_features(torch.zeros(1, 3, 64, 64))


def test_weights_table():
    for name, paper in (("gan_inversion", {"ffhq": {"ffhq_34": (51.7, 0.8), "celeba_19": (51.5, 2.3)},
                                           "lsun_horse": {"horse_21": (17.7, 0.4)}}),
                        ("gan_encoder", {"ffhq": {"ffhq_34": (53.9, 1.3), "celeba_19": (53.9, 0.8)},
                                         "lsun_horse": {"horse_21": (26.7, 0.7)}})):
        table = bench.get_backbone_class(name).weights
        assert sorted(table) == ["ffhq", "lsun_horse"]
        assert table["ffhq"].url == ("https://drive.google.com/uc?id=1cUv_reLE6k3604or78EranS7XzuVMWeO",)
        assert table["lsun_horse"].url == ("https://drive.google.com/uc?id=1TkLLnuX86B_BMo2ocYD0kX9kWh53rUVX",)
        assert [table[t].arch["size"] for t in ("ffhq", "lsun_horse")] == [1024, 256]
        for tag, w in table.items():
            assert w.domain == tag and w.paper_miou == paper[tag]
            assert "MIT" in w.license and "NVIDIA" in w.license and "LSUN-Cat" in w.description
        for tag in ("lsun_cat", "lsun_bedroom"):
            with pytest.raises(bench.BenchError, match=rf"no official e4e checkpoint for {tag}.*pass --weights"):
                bench.create_backbone(f"{name}.{tag}", pretrained=False, device="meta")


@pytest.mark.parametrize("name, kwargs, message", [
    ("gan_encoder", {"layers": ["body.4"]}, r"layer 'body\.4' is out of range; the body has units body\.0\.\.body\.3"),
    ("gan_encoder", {"layers": ["fc"]}, r"layer 'fc' is not a map name"),
    ("gan_encoder", {"layers": ["c1", "c1"]}, "twice"),
    ("gan_inversion", {"layers": ["convs.6"]}, r"'convs\.6' is not a map of this 32 px generator"),
    ("gan_inversion", {"layers": "body"}, r"non-empty list of map names"),
    ("gan_inversion", {"refine_steps": -1}, r"refine_steps must be an integer >= 0"),
    ("gan_inversion", {"arch": {"channels": 3}}, r"unknown key\(s\) \['channels'\]"),
    ("gan_inversion", {"arch": {"encoder_size": 512}}, r"encoder_size must be a multiple of 16 in 16\.\.256"),
    ("gan_inversion", {"arch": {"encoder_type": "SingleStyleCodeEncoder"}}, r"'SingleStyleCodeEncoder' is not supported"),
])
def test_invalid_settings_are_errors(name, kwargs, message):
    kwargs = {"arch": TINY_ARCH, **kwargs}
    with pytest.raises(bench.BenchError, match=message):
        bench.create_backbone(name, pretrained=False, device="meta", **kwargs)


def test_latent_refinement_is_optional_deterministic_and_lowers_the_error():
    torch.manual_seed(3)
    base = bench.create_backbone("gan_inversion", pretrained=False, arch=TINY_ARCH)
    refined = bench.create_backbone("gan_inversion", pretrained=False, arch=TINY_ARCH, refine_steps=5, refine_lr=0.05)
    refined.encoder, refined.decoder = base.encoder, base.decoder
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = base.preprocess(images)
    with torch.inference_mode():  # as extract() calls it
        start, end, again = base.codes(x), refined.codes(x), refined.codes(x)
        errors = [(base.decoder(c)[0] - x).pow(2).mean().item() for c in (start, end)]
    assert torch.equal(end, again) and not torch.equal(start, end) and errors[1] < errors[0]
    assert refined.config()["refine_steps"] == 5 and base.config()["refine_steps"] == 0


def test_psp_gradual_style_encoder_uses_the_heads_without_deltas():
    bb = bench.create_backbone("gan_inversion", pretrained=False, arch={**TINY_ARCH, "encoder_type": "GradualStyleEncoder"})
    with torch.no_grad():
        out = bb.encoder(torch.zeros(1, 3, 32, 32), heads=True)
    assert torch.equal(out["codes_raw"], torch.stack(out["styles"], dim=1))
