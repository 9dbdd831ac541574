"""VDVAE backbone: manifest (C1), feature dims (C2), safe loading (C3), both file flavours (C6),
preprocessing (C7), seeded noise (C8), hyper-parameters from ``arch`` and from the file's shapes.

Numerical equivalence with the official code is in ``test_vdvae_fidelity.py``.
"""
from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import pytest
import torch

import bench
from backbones._vdvae_net import VDVAE, VDVAEHparams, parse_widths
from backbones.vdvae import FFHQ256_HPARAMS, TINY_HPARAMS, VDVAEBackbone
from bench.errors import CheckpointError
from helpers import WritesMarker

FIXTURE = Path(__file__).parent / "fixtures" / "vdvae"
CKPT = FIXTURE / "fixture-model-ema.th"
HPARAMS = json.loads((FIXTURE / "metadata.json").read_text())["hparams"]
BLOCKS = {"enc_blocks": HPARAMS["enc_blocks"], "dec_blocks": HPARAMS["dec_blocks"]}
#: a second configuration, unlike the fixture's: other widths per resolution, zdim, bottleneck,
#: mixtures, start states only up to 8 x 8, a plain block and a 3 x 3 stem at 16 px
OTHER = {"width": 24, "zdim": 3, "bottleneck_multiple": 0.5, "custom_width_str": "4:40,1:40", "no_bias_above": 8,
         "num_mixtures": 3, "enc_blocks": "16x1,16d4,4,4d4,1x1", "dec_blocks": "1x1,4m1,4x1,16m4"}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _random_state(hparams: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random model's state with no zero tensor, so that any mix-up changes the features."""
    torch.manual_seed(seed)
    size = int(re.match(r"\d+", hparams["enc_blocks"]).group())
    model = VDVAE(VDVAEHparams.from_dict({**TINY_HPARAMS, **hparams, "image_size": size}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return _state(model)


def _images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---- C1, C2: the paper configuration on the meta device ------------------------------------------

def test_ffhq256_state_dict_equals_the_manifest():
    bb = bench.create_backbone("vdvae", pretrained=False, device="meta")
    manifest = json.loads((FIXTURE / "vdvae_ffhq256.json").read_text())
    got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in bb.model.state_dict().items()]
    assert got == manifest  # keys, shapes, dtypes and order
    assert len(got) == 2272 and sum(v.numel() for v in bb.model.state_dict().values()) == 114_874_852


def test_ffhq256_feature_dims_on_meta():
    bb = bench.create_backbone("vdvae", pretrained=False, device="meta")
    config = json.loads((FIXTURE / "model_config_vdvae_ffhq256.json").read_text())["vdvae_ffhq256"]
    expected = ([tuple(s) for s in config["encoder_activations_256"].values()]
                + [tuple(s) for s in config["decoder_xs_256"].values()])
    maps = bb.forward_features(torch.empty(1, 256, 256, 3, device="meta"))
    assert [tuple(m.shape[1:]) for m in maps] == expected
    assert [(f.channels, 256 // f.stride, 256 // f.stride) for f in bb.feature_info] == expected
    assert [f.name for f in bb.feature_info] == [f"enc{r}" for r in (256, 128, 64, 32, 16, 8, 4, 1)] + [
        f"dec{r}" for r in (1, 4, 8, 16, 32, 64, 128, 256)]
    assert bb.num_features == sum(m.shape[1] for m in maps) == 8192
    assert bb.input_size == 256 and bb.config()["arch"] == {**FFHQ256_HPARAMS}


def test_weights_table():
    (tag, entry), = VDVAEBackbone.weights.items()
    assert tag == VDVAEBackbone.default_tag == "ffhq256" and entry.domain == "ffhq"
    assert entry.url == ("https://openaipublic.blob.core.windows.net/very-deep-vaes-assets/vdvae-assets/"
                         "ffhq256-iter-1700000-model-ema.th",)
    assert entry.license.startswith("MIT") and entry.arch == dict(FFHQ256_HPARAMS)
    assert entry.paper_miou == {"ffhq_34": (57.3, 1.1), "celeba_19": (54.1, 1.0)}
    assert "none exists for LSUN or ADE20K" in entry.description  # the absence of other domains is stated


# ---- C6: both official flavours, strict loading ---------------------------------------------------

def test_both_flavours_load_strictly(tmp_path):
    official = torch.load(CKPT, weights_only=True)
    ema = bench.create_backbone("vdvae", checkpoint=CKPT, arch=HPARAMS)
    assert ema.tag is None and ema.weights_sha256() == "9755f6b1a61504fb3ffb21da5dd90f4ae6c798ac4f4e672d94f353c9f22746e0"
    ddp = tmp_path / "fixture-model.th"  # the non-EMA file: saved from the DDP wrapper
    torch.save({f"module.{k}": v for k, v in official.items()}, ddp)
    plain = bench.create_backbone("vdvae", checkpoint=ddp, arch=HPARAMS)
    for bb in (ema, plain):
        assert list(bb.model.state_dict()) == list(official)
        assert all(torch.equal(bb.model.state_dict()[k], v) for k, v in official.items())
    from bench.checkpoints import save_safetensors

    st = save_safetensors(official, tmp_path / "fixture.safetensors")
    assert torch.equal(bench.create_backbone("vdvae", checkpoint=st, arch=HPARAMS).model.decoder.gain,
                       official["decoder.gain"])


@pytest.mark.parametrize("prefix", ["", "module."])
def test_a_deleted_key_is_named_with_its_shape(tmp_path, prefix):
    state = torch.load(CKPT, weights_only=True)
    del state["decoder.dec_blocks.3.prior.c2.weight"]
    path = tmp_path / "cut.th"
    torch.save({prefix + k: v for k, v in state.items()}, path)
    with pytest.raises(CheckpointError, match=r"cut\.th does not fit the model: missing key "
                                              r"'decoder\.dec_blocks\.3\.prior\.c2\.weight' \(expected shape \(8, 8, 3, 3\)\)"):
        bench.create_backbone("vdvae", checkpoint=path, arch=HPARAMS)


def test_other_blocks_than_the_file_give_a_hint(tmp_path):
    # Without arch the block strings are FFHQ-256's: 68 encoder blocks, the fixture file has 14.
    with pytest.raises(CheckpointError, match=r"missing key 'encoder\.enc_blocks\.14\.c1\.weight'.*"
                                              r"pass arch= with the checkpoint's enc_blocks and dec_blocks"):
        bench.create_backbone("vdvae", checkpoint=CKPT)


# ---- C3: malicious pickles ------------------------------------------------------------------------

def _payloads(marker: Path) -> dict[str, bytes]:
    code = f"open({str(marker)!r}, 'w').write('pwned')".encode()
    out = {f"protocol{p}": pickle.dumps({"w": WritesMarker(marker)}, protocol=p) for p in (0, 2, 3, 4, 5)}
    out["INST"] = b"(V" + code + b"\nibuiltins\nexec\n."
    out["OBJ"] = b"(cbuiltins\nexec\nV" + code + b"\no."
    for name, legacy in (("torch_zip", False), ("torch_legacy", True)):
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(1), "evil": WritesMarker(marker)}, buf, _use_new_zipfile_serialization=not legacy)
        out[name] = buf.getvalue()
    return out


def test_malicious_payloads_really_run_on_an_unsafe_load(tmp_path):
    for name, data in _payloads(tmp_path / "probe").items():
        (tmp_path / "probe").unlink(missing_ok=True)
        if name.startswith("torch"):
            torch.load(io.BytesIO(data), weights_only=False)
        else:
            pickle.loads(data)
        assert (tmp_path / "probe").exists(), name


@pytest.mark.parametrize("name", ["protocol0", "protocol2", "protocol3", "protocol4", "protocol5", "INST", "OBJ",
                                  "torch_zip", "torch_legacy"])
@pytest.mark.parametrize("pretrained", [True, False])
def test_malicious_pickles_are_refused_by_name(tmp_path, name, pretrained):
    marker = tmp_path / "marker"
    path = tmp_path / "evil-model-ema.th"
    path.write_bytes(_payloads(marker)[name])
    # A random-init control reads the file for its shapes: the same checks apply.
    with pytest.raises(CheckpointError, match=r"evil-model-ema\.th refers to the Python global (__builtin__|builtins)"
                                              r"\.exec.*nothing from the file was executed"):
        bench.create_backbone("vdvae", checkpoint=path, arch=HPARAMS, pretrained=pretrained)
    assert not marker.exists()


def test_load_from_bytes_and_persistent_ids_are_refused(tmp_path):
    marker = tmp_path / "marker"

    class FromBytes:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (pickle.dumps(WritesMarker(marker)),)

    class PersistentIds(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "evil", f"open({str(marker)!r}, 'w')") if obj == "X" else None

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1), "evil": FromBytes()}, buf)
    (tmp_path / "bytes.th").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=r"torch\.storage\._load_from_bytes"):
        bench.create_backbone("vdvae", checkpoint=tmp_path / "bytes.th", arch=HPARAMS)
    buf = io.BytesIO()
    PersistentIds(buf, protocol=2).dump({"w": "X"})
    (tmp_path / "pid.th").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=r"pid\.th was refused.*persistent_load"):
        bench.create_backbone("vdvae", checkpoint=tmp_path / "pid.th", arch=HPARAMS)
    assert not marker.exists()


# ---- C7: preprocessing ----------------------------------------------------------------------------

def test_preprocessing_constants_and_layout():
    bb = bench.create_backbone("vdvae", **VDVAEBackbone.tiny)
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    images[:, 1] = 255
    x = bb.preprocess(images)
    assert tuple(x.shape) == (1, 32, 32, 3)  # NHWC
    torch.testing.assert_close(x[0, 5, 7], torch.tensor([-1.6159, 2.0349, -1.6159]), atol=5e-5, rtol=0)
    assert tuple(bb.preprocess(_images(64, 1)).shape) == (1, 32, 32, 3)  # another size is resized
    with pytest.raises(bench.BenchError, match="uint8"):
        bb.preprocess(images.float())
    with pytest.raises(bench.BenchError, match=r"NHWC inputs \[B, 32, 32, 3\].*got \[1, 3, 32, 32\]"):
        bb.forward_features(images.float())  # an NCHW tensor is refused, not misread


# ---- C8: seeded posterior samples -----------------------------------------------------------------

def test_same_seed_same_features_other_seed_other_decoder_features():
    images = _images(32, 3)
    first, again, other = (bench.create_backbone("vdvae", checkpoint=CKPT, arch=HPARAMS, seed=s).extract(images)
                           for s in (7, 7, 8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    n_enc = 5
    assert all(torch.equal(a, b) for a, b in zip(first[:n_enc], other[:n_enc]))  # the encoder has no noise
    assert all((a - b).abs().max() > 0.1 for a, b in zip(first[n_enc:], other[n_enc:]))


def test_noise_follows_the_image_not_its_batch_position():
    bb = bench.create_backbone("vdvae", checkpoint=CKPT, arch=HPARAMS, seed=3)
    images = _images(32, 3)
    x = bb.preprocess(images)
    batch = bb.latent_noise(x)
    reordered = bb.latent_noise(x.flip(0))
    alone = bb.latent_noise(x[1:2])
    assert all(torch.equal(e[1:2], a) and torch.equal(e.flip(0), r) for e, a, r in zip(batch, alone, reordered))
    assert not torch.equal(batch[-1][0], batch[-1][1])  # two images, two draws
    full, single = bb.extract(images), bb.extract(images[1:2])
    assert all((f[1:2] - s).abs().max() < 1e-5 for f, s in zip(full, single))


def test_posterior_mean_needs_no_seed():
    images = _images(32, 2)
    a, b = (bench.create_backbone("vdvae", checkpoint=CKPT, arch=HPARAMS, posterior="mean", seed=s) for s in (0, 1))
    assert a.latent_noise(a.preprocess(images)) is None and a.config()["seed"] is None
    assert a.config() == b.config()
    assert all(torch.equal(x, y) for x, y in zip(a.extract(images), b.extract(images)))
    sampled = bench.create_backbone("vdvae", checkpoint=CKPT, arch=HPARAMS).config()
    assert (sampled["posterior"], sampled["seed"]) == ("sample", 0)
    with pytest.raises(bench.BenchError, match="posterior must be one of"):
        bench.create_backbone("vdvae", **VDVAEBackbone.tiny, posterior="median")
    with pytest.raises(bench.BenchError, match="seed must be an integer"):
        bench.create_backbone("vdvae", **VDVAEBackbone.tiny, seed=True)


# ---- hyper-parameters: arch=, and what the file's shapes tell -------------------------------------

def test_hparams_are_read_from_the_file_where_the_shapes_tell():
    inferred = bench.create_backbone("vdvae", checkpoint=CKPT, arch=BLOCKS)
    explicit = bench.create_backbone("vdvae", checkpoint=CKPT, arch=HPARAMS)
    # no_bias_above is read as the largest resolution with a start state (32, every one here): same network
    assert inferred.hparams.to_dict() == {**explicit.hparams.to_dict(), "no_bias_above": 32}
    images = _images(32)
    assert all(torch.equal(a, b) for a, b in zip(inferred.extract(images), explicit.extract(images)))


def test_an_unseen_configuration_loads_from_its_shapes(tmp_path):
    state = _random_state(OTHER)
    path = tmp_path / "other-model-ema.th"
    torch.save(state, path)
    bb = bench.create_backbone("vdvae", checkpoint=path, arch={k: OTHER[k] for k in BLOCKS})
    hp = bb.hparams
    assert (hp.width, hp.zdim, hp.bottleneck_multiple, hp.num_mixtures, hp.no_bias_above, hp.image_size) == (
        24, 3, 0.5, 3, 4, 16)  # no_bias_above 8 reads as 4: no decoder resolution in between
    assert parse_widths(hp.custom_width_str, hp.width) == {4: 40, 1: 40}
    assert all(torch.equal(bb.model.state_dict()[k], v) for k, v in state.items())
    assert [(f.name, f.channels, f.stride) for f in bb.feature_info] == [
        ("enc16", 24, 1), ("enc4", 40, 4), ("enc1", 40, 16), ("dec1", 40, 16), ("dec4", 40, 4), ("dec16", 24, 1)]
    maps = bb.extract(_images(16))
    assert [tuple(m.shape) for m in maps] == [(2, f.channels, 16 // f.stride, 16 // f.stride) for f in bb.feature_info]
    assert torch.count_nonzero(maps[1][:, 24:]) > 0  # channels 24..39 were padded, then filled by block '4'


def test_random_control_reads_only_the_architecture_of_the_file(tmp_path):
    torch.manual_seed(0)
    control = bench.create_backbone("vdvae", checkpoint=CKPT, arch=BLOCKS, pretrained=False)
    official = torch.load(CKPT, weights_only=True)
    assert control.weights_sha256() == "" and control.hparams.width == 32
    assert list(control.model.state_dict()) == list(official)
    assert not torch.equal(control.model.decoder.gain, official["decoder.gain"])
    assert not torch.equal(control.model.encoder.in_conv.weight, official["encoder.in_conv.weight"])


@pytest.mark.parametrize("arch, message", [
    ({"widht": 8}, r"unknown key\(s\) \['widht'\]"),
    ({"enc_blocks": "32x2,32q2"}, r"enc_blocks item '32q2' is not R, RxN or Rd"),
    ({"enc_blocks": "32x1,32d2,8x1"}, r"block 2 is declared at 8 but runs at 16"),
    ({"dec_blocks": "1x1,8m4,32m8"}, r"8m4 needs a state computed earlier"),
    ({"dec_blocks": "1x1,2m1"}, r"never reach the image size 32"),
    ({"dataset": "imagenet32"}, r"dataset 'imagenet32': its preprocessing constants are unknown"),
    ({"width": 8.0}, r"width must be an integer"),
])
def test_invalid_arch_is_an_error(arch, message):
    with pytest.raises(bench.BenchError, match=message):
        bench.create_backbone("vdvae", pretrained=False, device="meta", arch={**TINY_HPARAMS, **arch})


def test_training_only_hparams_are_accepted_and_ignored():
    bb = bench.create_backbone("vdvae", pretrained=False, device="meta", arch={**TINY_HPARAMS, "ema_rate": 0.999})
    assert "ema_rate" not in bb.config()["arch"]
