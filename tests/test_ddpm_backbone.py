"""The ``ddpm`` plugin and ADM UNet variants: validation, loading, schedules and every flag combination."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import bench
from backbones import _diffusion
from backbones._adm_unet import ADMFlags, ADMUNet
from backbones.ddpm import DDPM, TINY_ARCH
from bench import hub
from bench.errors import BenchError, CheckpointError

SMALL64 = Path(__file__).parent / "fixtures" / "adm_small64" / "small64" / "weights.safetensors"
S = TINY_ARCH["image_size"]
SMALL64_FLAGS = json.loads((SMALL64.parents[1] / "model_configs.json").read_text())["small64"]["create_model_and_diffusion_kwargs"]




def tiny(**kwargs) -> DDPM:
    return bench.create_backbone("ddpm", **{**DDPM.tiny, **kwargs})


def randomised(net: ADMUNet, seed: int = 0) -> ADMUNet:
    """Give the zero-initialised layers random values, so every branch influences the output."""
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        if not p.detach().abs().sum():
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    return net.eval()


# ---- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"blocks": (5, 18)}, r"block 18 is out of range; valid blocks are 0\.\.17"),
    ({"blocks": (-1,)}, r"block -1 is out of range; valid blocks are 0\.\.17"),
    ({"blocks": (5, 5)}, r"blocks lists 5 twice"),
    ({"blocks": ()}, r"non-empty"),
    ({"steps": (50, 1000)}, r"step 1000 is out of range; valid steps are 0\.\.999"),
    ({"steps": (50, 50)}, r"steps lists 50 twice"),
])
def test_invalid_blocks_and_steps_name_value_and_range(kwargs, message):
    with pytest.raises(BenchError, match=message):
        tiny(**kwargs)


def test_steps_keep_user_order_and_blocks_are_sorted():
    bb = tiny(blocks=(12, 5), steps=(250, 50))
    assert [f.name for f in bb.feature_info] == ["t250.b5", "t250.b12", "t50.b5", "t50.b12"]
    maps = bb.forward_features(torch.zeros(1, 3, S, S))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 8, 8), (1, 32, 32, 32)] * 2


def test_images_must_be_square_and_of_the_model_size():
    bb = tiny()
    with pytest.raises(BenchError, match=r"square images, got 64x32"):
        bb.preprocess(torch.zeros(1, 3, 64, 32, dtype=torch.uint8))
    with pytest.raises(BenchError, match=r"takes 64x64 images, got 32x32"):
        bb.forward_features(torch.zeros(1, 3, 32, 32))
    with pytest.raises(BenchError, match=r"uint8"):
        bb.preprocess(torch.zeros(1, 3, S, S))


def test_preprocess_maps_0_to_minus_1_and_255_to_plus_1():
    bb = tiny()
    values = torch.arange(256, dtype=torch.uint8)
    images = values.repeat(48).reshape(1, 3, S, S)  # every 8-bit value, 48 times
    x = bb.preprocess(images)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert (x - (2 * (images.float() / 255) - 1)).abs().max().item() < 1e-6


def test_noise_from_seed_is_shared_and_explicit_noise_is_used():
    a, b, c = tiny(seed=0), tiny(seed=0), tiny(seed=1)
    assert torch.equal(a.noise, b.noise) and not torch.equal(a.noise, c.noise)
    assert a.noise.shape == (1, 3, S, S)
    x = torch.rand(2, 3, S, S) * 2 - 1
    # Separate model instances may pick different CPU kernels: equal up to float rounding only.
    assert all((p - q).abs().max() < 1e-4 for p, q in zip(a.forward_features(x), b.forward_features(x)))
    # Same weights as c (seed 1), but a's noise: the explicit tensor is what gets used.
    explicit = tiny(seed=1, noise=a.noise.clone())
    assert torch.equal(explicit.noise, a.noise)
    assert (explicit.forward_features(x)[0] - c.forward_features(x)[0]).abs().max() > 1e-3
    assert explicit.config()["seed"] is None and len(explicit.config()["noise_sha256"]) == 64
    with pytest.raises(BenchError, match=r"noise must be a tensor of shape \[1, 3, 64, 64\]"):
        tiny(noise=torch.zeros(1, 3, 16, 16))


def test_batched_steps_equal_one_forward_per_step():
    bb = tiny()
    randomised(bb.model)
    x = torch.rand(2, 3, S, S) * 2 - 1
    maps = bb.forward_features(x)
    per_step = []
    for t in bb.steps:
        x_t = _diffusion.q_sample(x, t, bb.noise, bb._alphas_cumprod)
        per_step += bb.model.forward_blocks(x_t, torch.tensor([t]), bb.blocks)
    assert len(maps) == len(per_step) == 15
    for a, b in zip(maps, per_step):
        assert (a - b).abs().max().item() < 1e-4


def test_config_records_what_determines_the_features():
    cfg = tiny(blocks=(6, 5)).config()
    assert cfg["blocks"] == [5, 6] and cfg["steps"] == [50, 150, 250] and cfg["seed"] == 0
    assert cfg["arch"]["num_channels"] == 32 and cfg["fp16"] is False
    json.dumps(cfg)


# ---- construction without weights -----------------------------------------------------------------
def test_random_init_needs_no_file_and_meta_allocates_nothing(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("pretrained=False must not fetch weights")

    monkeypatch.setattr(hub, "fetch_weights", no_download)
    with pytest.raises(BenchError, match="block 18 is out of range"):  # checked before any download
        bench.create_backbone("ddpm.lsun_cat", blocks=(5, 18))
    bb = bench.create_backbone("ddpm.lsun_cat", pretrained=False, device="meta")
    assert bb.num_features == 8448
    assert all(p.is_meta for p in bb.model.parameters())
    assert bb.weights_sha256() == ""


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = tiny(seed=3), tiny(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_weights_table_declares_the_official_checkpoints():
    w = DDPM.weights
    assert set(w) == {"lsun_bedroom", "lsun_cat", "lsun_horse", "ffhq", "demo"}
    assert DDPM.default_tag == "lsun_bedroom"
    assert w["lsun_cat"].url[0].endswith("ddpm_checkpoints/lsun_cat.pt") and w["lsun_cat"].url[1].endswith("jul-2021/lsun_cat.pt")
    assert w["lsun_bedroom"].paper_miou == {"bedroom_28": (49.4, 1.9), "ade_bedroom_30": (34.6, 1.7)}
    assert w["lsun_horse"].paper_miou == {"horse_21": (65.0, 0.8)} and w["lsun_cat"].paper_miou == {"cat_15": (53.7, 3.3)}
    assert w["ffhq"].paper_miou == {"ffhq_34": (59.1, 1.4), "celeba_19": (59.9, 1.0)}
    assert ADMFlags.from_dict(w["demo"].arch).attention_rates() == (8, 16, 32)
    demo = bench.create_backbone("ddpm.demo", pretrained=False, device="meta")
    assert [(f.channels, f.stride) for f in demo.feature_info[:5]] == [(64, 8), (64, 8), (64, 8), (64, 4), (32, 2)]


# ---- checkpoints -----------------------------------------------------------------------------------
def test_pt_and_safetensors_checkpoints_give_identical_features(tmp_path):
    from safetensors.torch import load_file

    pt = tmp_path / "small64.pt"
    torch.save(load_file(SMALL64), pt)  # the official format: a plain state dict
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    from_st = bench.create_backbone("ddpm", checkpoint=SMALL64, arch=SMALL64_FLAGS, blocks=(5,), steps=(50,))
    from_pt = bench.create_backbone("ddpm", checkpoint=pt, arch=SMALL64_FLAGS, blocks=(5,), steps=(50,))
    # Same weights in differently allocated tensors: equal up to float rounding (observed ~1e-5).
    assert (from_st.forward_features(x)[0] - from_pt.forward_features(x)[0]).abs().max().item() < 1e-4
    assert from_st.weights_sha256() != from_pt.weights_sha256() != ""
    assert from_pt.tag is None  # a user's checkpoint carries no paper numbers


def test_safetensors_metadata_supplies_the_arch(tmp_path, monkeypatch):
    net = ADMUNet(ADMFlags.from_dict(TINY_ARCH))
    path = tmp_path / "model_ema.safetensors"
    save_file(net.state_dict(), path, metadata={"bench_arch": json.dumps(ADMFlags.from_dict(TINY_ARCH).to_dict())})
    assert bench.create_backbone("ddpm", checkpoint=path).image_size == S

    # The shipped demo tag goes through bench.hub.fetch_weights with the plugin's file and name.
    calls = []
    monkeypatch.setattr(hub, "fetch_weights", lambda entry, module_file, name: calls.append((entry.tag, name)) or path)
    bb = bench.create_backbone("ddpm.demo")
    assert calls == [("demo", "ddpm.demo")] and bb.tag == "demo" and bb.image_size == S
    assert bb.weights_sha256() == hub.sha256_file(path)


def test_checkpoint_with_missing_key_or_wrong_shape_names_the_key(tmp_path):
    state = ADMUNet(ADMFlags.from_dict(TINY_ARCH)).state_dict()
    missing = {k: v for k, v in state.items() if k != "output_blocks.3.1.qkv.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing\.pt.*missing key 'output_blocks\.3\.1\.qkv\.bias'"):
        tiny(pretrained=True, checkpoint=tmp_path / "missing.pt")
    wrong = dict(state, **{"out.2.weight": torch.zeros(3, 32, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"'out\.2\.weight' has shape \(3, 32, 3, 3\), expected \(6, 32, 3, 3\)"):
        tiny(pretrained=True, checkpoint=tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"not found: .*absent\.pt"):
        tiny(checkpoint=tmp_path / "absent.pt")


# ---- schedules -------------------------------------------------------------------------------------
def test_cosine_schedule_follows_the_closed_form_and_changes_features():
    ab = _diffusion.alphas_cumprod(_diffusion.make_betas("cosine", 1000))

    def f(t: float) -> float:
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 50, 500, 900):
        assert ab[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert np.all(np.diff(ab) < 0) and _diffusion.make_betas("cosine", 1000).max() == 0.999
    assert _diffusion.make_betas("linear", 250)[0] == pytest.approx(4e-4)  # scaled by 1000/steps
    with pytest.raises(BenchError, match=r"unknown noise_schedule 'sqrt'"):
        _diffusion.make_betas("sqrt", 1000)

    x = torch.rand(1, 3, S, S) * 2 - 1
    linear = tiny(steps=(250,))
    cosine = tiny(steps=(250,), arch={**TINY_ARCH, "noise_schedule": "cosine"})
    randomised(linear.model)
    cosine.model.load_state_dict(linear.model.state_dict())
    assert (linear.forward_features(x)[-1] - cosine.forward_features(x)[-1]).abs().max().item() > 1e-3


# ---- flags and UNet variants ---------------------------------------------------------------------
def test_flags_parse_official_string_values_and_reject_unknown_keys():
    flags = ADMFlags.from_dict({"image_size": "64", "use_fp16": "True", "channel_mult": [1, 2, 2],
                                "attention_resolutions": "32, 16", "dropout": "0.1", "use_checkpoint": "False",
                                "timestep_respacing": ""})
    assert flags.image_size == 64 and flags.use_fp16 is True and flags.channel_mult == "1,2,2"
    assert flags.attention_rates() == (2, 4) and flags.dropout == 0.1
    assert ADMFlags.from_dict(flags.to_dict()) == flags
    assert ADMFlags(image_size=512).resolved_channel_mult() == (0.5, 1, 1, 2, 2, 4, 4)
    for bad, message in [({"num_chanels": 3}, r"unknown ADM flag 'num_chanels'.*num_channels"),
                         ({"learn_sigma": "maybe"}, r"'learn_sigma': expected a boolean, got 'maybe'"),
                         ({"timestep_respacing": "ddim25"}, r"'timestep_respacing'='ddim25' is not supported"),
                         ({"image_size": 48}, r"image_size 48 has no official default")]:
        with pytest.raises(BenchError, match=message):
            ADMFlags.from_dict(bad)


VARIANTS = {
    "class_cond": {"class_cond": True},
    "no_scale_shift": {"use_scale_shift_norm": False},
    "conv_resample": {"resblock_updown": False},
    "eps_only": {"learn_sigma": False},
    "num_heads": {"num_head_channels": -1, "num_heads": 2, "num_heads_upsample": 1},
    "new_attention_order": {"use_new_attention_order": True},
    "dropout": {"dropout": 0.3},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_unet_variant_builds_and_runs(name):
    flags = ADMFlags.from_dict({"image_size": 32, "num_channels": 32, "channel_mult": "1,2,2",
                                "attention_resolutions": "16,8", "num_head_channels": 16, "resblock_updown": True,
                                "learn_sigma": True, **VARIANTS[name]})
    torch.manual_seed(0)
    net = randomised(ADMUNet(flags))
    keys = net.state_dict()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    y = torch.tensor([1, 7]) if flags.class_cond else None
    with torch.no_grad():
        out = net(x, t, y)
        blocks = net.forward_blocks(x, t, range(net.num_output_blocks), y)
    assert out.shape == (2, 3 if name == "eps_only" else 6, 32, 32) and torch.isfinite(out).all()
    assert [(b.shape[1], b.shape[2]) for b in blocks] == net.block_shapes()
    if name == "class_cond":
        assert keys["label_emb.weight"].shape == (1000, 128) and list(keys)[4] == "label_emb.weight"
        with torch.no_grad():
            assert (net(x, t, torch.tensor([2, 3])) - out).abs().max() > 1e-4
        with pytest.raises(BenchError, match="class_cond"):
            net(x, t)
    if name == "no_scale_shift":
        assert keys["input_blocks.1.0.emb_layers.1.weight"].shape == (32, 128)
    if name == "conv_resample":
        assert "input_blocks.3.0.op.weight" in keys and "output_blocks.2.2.conv.weight" in keys
    if name == "num_heads":
        assert net.input_blocks[4][1].num_heads == 2 and net.output_blocks[0][1].num_heads == 1
    if name == "dropout":  # inactive in eval mode: deterministic
        with torch.no_grad():
            assert torch.equal(net(x, t), out)


def test_fp16_torso_keeps_head_in_float32_and_stays_close():
    # fp16 convs are slow on CPU: a 3-level 32 px model keeps this test short.
    small = {"image_size": 32, "num_channels": 32, "channel_mult": "1,2,2", "attention_resolutions": "16,8",
             "num_head_channels": 16, "resblock_updown": True, "learn_sigma": True}
    full = tiny(arch=small, blocks=(2, 5), steps=(50, 400))
    randomised(full.model)
    half = tiny(arch=small, blocks=(2, 5), steps=(50, 400), fp16=True)
    half.model.load_state_dict(full.model.state_dict())  # copy_ casts to each parameter's dtype
    assert half.model.out[2].weight.dtype == torch.float32 and half.model.time_embed[0].weight.dtype == torch.float32
    assert half.model.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert half.model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # GroupNorm
    assert half.model.input_blocks[1][0].emb_layers[1].weight.dtype == torch.float32  # Linear
    assert half.model.input_blocks[4][1].qkv.weight.dtype == torch.float16  # attention conv1d
    assert half.config()["fp16"] is True
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    full_maps, half_maps = full.forward_features(x), half.forward_features(x)
    assert all(m.dtype == torch.float32 for m in half_maps)
    for a, b in zip(full_maps, half_maps):
        assert (a - b).abs().max().item() < 0.05
    with torch.no_grad():
        out = half.model(x, torch.tensor([50]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
