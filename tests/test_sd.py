"""Stable Diffusion backbone (``sd``): tiny random diffusers models built here, no download."""
from __future__ import annotations

import json

import pytest
import torch

import bench
from backbones._sd_files import folder_digest, folder_files
from backbones.sd import ARCHS, StableDiffusion, build_models, unet_maps
from bench.check import build_tiny, check_backbone, check_declarations, check_instance
from bench.checkpoints import save_safetensors
from bench.errors import CheckpointError
from helpers import WritesMarker

TINY = dict(StableDiffusion.tiny)


def _images(n: int = 2, seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_tiny_variant_passes_the_contract_and_bench_check(tmp_path):
    check_declarations(StableDiffusion)
    check_instance(build_tiny(StableDiffusion))
    lines = list(check_backbone("sd:tiny", out=tmp_path))  # contract + 4-image demo run of the tiny arch
    assert lines[3] == "contract: OK" and lines[-1].startswith("4-image demo evaluation")


@pytest.mark.parametrize("tag, size, cross", [("v1_5", 512, 768), ("v2_1", 768, 1024)])
def test_default_feature_dims_from_the_config_on_the_meta_device(tag, size, cross):
    bb = bench.create_backbone(f"sd.{tag}", pretrained=False, device="meta")
    assert not hasattr(bb, "unet")  # nothing built, nothing loaded
    assert bb.image_size == size and bb.num_features == 1920
    assert [(f.name, f.channels, f.stride) for f in bb.feature_info] == [("t261.up1", 1280, 16), ("t261.up2", 640, 8)]
    every = bench.create_backbone(f"sd.{tag}", pretrained=False, device="meta", blocks=[0, 1, 2, 3], steps=[50, 150])
    assert every.num_features == 2 * 3520
    # The strides computed from the config agree with a real forward of the full UNet on the meta device.
    arch = ARCHS[tag]
    unet = build_models(arch, meta=True)["unet"]
    assert sum(p.numel() for p in unet.parameters()) // 10**6 in (859, 865)  # SD 1.5: 859.5 M, 2.1: 865.9 M
    shapes = {}

    def keep(i: int):
        def hook(_module, _inputs, out) -> None:
            shapes[i] = tuple(out.shape)
        return hook

    for i, block in enumerate(unet.up_blocks):
        block.register_forward_hook(keep(i))
    latent = size // 8
    with torch.no_grad():
        unet(torch.zeros(1, 4, latent, latent, device="meta"), torch.tensor([261], device="meta"),
             encoder_hidden_states=torch.zeros(1, 77, cross, device="meta"))
    assert [(shapes[i][1], size // shapes[i][2]) for i in range(4)] == unet_maps(arch["unet"], arch["vae"])


def test_invalid_settings_fail_in_one_line():
    def make(**kw):
        return bench.create_backbone("sd", pretrained=False, device="meta", **kw)

    with pytest.raises(bench.BenchError, match="sd block 4 is out of range; valid blocks are 0..3"):
        make(blocks=[1, 4])
    with pytest.raises(bench.BenchError, match="sd step 1000 is out of range; valid steps are 0..999"):
        make(steps=[1000])
    with pytest.raises(bench.BenchError, match="ensemble_size must be a positive integer"):
        make(ensemble_size=0)
    with pytest.raises(bench.BenchError, match="image_size must be a positive multiple of 64, got 100"):
        make(image_size=100)
    with pytest.raises(bench.BenchError, match="fp16 needs a CUDA device"):
        bench.create_backbone("sd", **TINY, fp16=True)
    with pytest.raises(bench.BenchError, match="no arch 'v3'"):
        make(arch="v3")
    with pytest.raises(bench.BenchError, match="arch without weights is a random model"):
        bench.create_backbone("sd:tiny")
    with pytest.raises(bench.BenchError, match="prompt 'a bedroom' needs CLIP's tokenizer files"):
        bench.create_backbone("sd", **TINY, prompt="a bedroom")
    assert make(image_size=256).feature_info[0].stride == 16


def test_seeded_noise_ensemble_mean_and_early_exit():
    images = _images()
    bb = bench.create_backbone("sd", **TINY)
    maps = bb.extract(images)
    assert _equal(maps, bench.create_backbone("sd", **TINY).extract(images))  # same seed: same features
    assert not _equal(maps, bench.create_backbone("sd", **{**TINY, "seed": 1}).extract(images))
    # The ensemble map is the mean over the noise draws, each draw shared by all steps.
    draws = bb.noise.clone()
    singles = []
    for eps in draws:
        bb.noise, bb.ensemble_size = eps[None], 1
        singles.append(bb.extract(images))
    for i, m in enumerate(maps):
        torch.testing.assert_close(m, (singles[0][i] + singles[1][i]) / 2, rtol=1e-5, atol=1e-6)
    # Stopping after the deepest requested block changes nothing; the noise follows diffusers' q_sample.
    full = bench.create_backbone("sd", **{**TINY, "blocks": (0, 1, 2)}).extract(images)
    assert _equal([full[0], full[1], full[3], full[4]], maps)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(ARCHS["tiny"]["scheduler"])
    z, eps, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), 250
    a = bb._alphas_cumprod[t]
    torch.testing.assert_close(a.sqrt().float() * z + (1 - a).sqrt().float() * eps,
                               sched.add_noise(z, eps, torch.tensor([t])))


def test_pickle_checkpoints_are_refused_in_one_line(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"state_dict": {"w": WritesMarker(marker)}}, tmp_path / "sd15.ckpt")
    with pytest.raises(CheckpointError) as err:
        bench.create_backbone("sd", checkpoint=tmp_path / "sd15.ckpt")
    assert "\n" not in str(err.value) and "sd loads safetensors only" in str(err.value)
    assert "sd15.ckpt is a pickle (.ckpt), refused" in str(err.value) and not marker.exists()
    with pytest.raises(CheckpointError, match="sd checkpoint not found"):
        bench.create_backbone("sd", checkpoint=tmp_path / "absent.safetensors")


def _save_tiny_folder(folder, seed: int) -> None:
    """A diffusers folder of random tiny models, written like save_pretrained and a CLIP tokenizer."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)  # the same init order as StableDiffusion(arch="tiny", seed=seed, pretrained=False)
    models = build_models(ARCHS["tiny"])
    models["unet"].save_pretrained(folder / "unet")
    models["vae"].save_pretrained(folder / "vae")
    (folder / "text_encoder").mkdir()
    save_safetensors(models["text_encoder"].state_dict(), folder / "text_encoder" / "model.safetensors")
    text_config = {"architectures": ["CLIPTextModel"], **models["text_encoder"].config.to_dict()}
    (folder / "text_encoder" / "config.json").write_text(json.dumps(text_config))
    (folder / "tokenizer").mkdir()
    vocab = {f"t{i}</w>": i for i in range(62)} | {"<|startoftext|>": 62, "<|endoftext|>": 63}
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    DDPMScheduler.from_config(ARCHS["tiny"]["scheduler"]).save_pretrained(folder / "scheduler")


def test_a_diffusers_folder_loads_strictly_and_gives_the_same_features(tmp_path):
    folder = tmp_path / "sd-tiny"
    _save_tiny_folder(folder, seed=3)
    settings = {k: v for k, v in TINY.items() if k not in ("pretrained", "arch")}
    loaded = bench.create_backbone("sd", checkpoint=folder, seed=3, **settings)
    reference = bench.create_backbone("sd", **{**TINY, "seed": 3})  # the same seeded init, the same noise
    images = _images()
    assert loaded.tag is None and loaded.image_size == 64
    assert loaded.weights_sha256() == folder_digest(folder_files(folder)) != ""
    assert [f.name for f in loaded.feature_info] == [f.name for f in reference.feature_info]
    assert _equal(loaded.extract(images), reference.extract(images))
    # A control reads the folder's configs only: the random init of its seed, no sha256.
    control = bench.create_backbone("sd", checkpoint=folder, pretrained=False, seed=4, **settings)
    assert control.weights_sha256() == "" and control.config()["weights_sha256"] == ""
    assert _equal(control.extract(images), bench.create_backbone("sd", **{**TINY, "seed": 4}).extract(images))
    assert not _equal(control.extract(images), bench.create_backbone("sd", checkpoint=folder, seed=4,
                                                                      **settings).extract(images))
    # A declared digest is checked; a wrong one is refused before any model is built.
    good = bench.create_backbone("sd", checkpoint=folder, sha256=loaded.weights_sha256(), **settings)
    assert good.weights_sha256() == loaded.weights_sha256()
    with pytest.raises(CheckpointError, match=r"have sha256 [0-9a-f]{64}, expected 0{64}"):
        bench.create_backbone("sd", checkpoint=folder, sha256="0" * 64, **settings)
    # Pickled weights in a folder are never read.
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no safetensors weights in .*unet.*only pickles.*refused"):
        bench.create_backbone("sd", checkpoint=folder, **settings)


def test_a_folder_missing_a_part_or_a_key_is_named(tmp_path):
    folder = tmp_path / "sd-tiny"
    _save_tiny_folder(folder, seed=0)
    settings = {k: v for k, v in TINY.items() if k not in ("pretrained", "arch")}
    path = folder / "text_encoder" / "model.safetensors"
    state = bench.checkpoints.load_state_dict(path)
    del state["text_model.final_layer_norm.bias"]
    save_safetensors(state, path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing key 'text_model\.final_layer_norm\.bias'"):
        bench.create_backbone("sd", checkpoint=folder, **settings)
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"diffusers folder incomplete: .*scheduler_config\.json not found"):
        bench.create_backbone("sd", checkpoint=folder, **settings)


# ---- original (LDM) single-file layout: written here from the tiny models, read by diffusers' converters ----

_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _moved(state, old: str, new: str, rename=None) -> dict:
    """The entries under ``old.`` renamed to ``new.`` (first name part through ``rename`` if given)."""
    out = {}
    for key, value in state.items():
        if key.startswith(old + "."):
            rest = key[len(old) + 1:]
            if rename:
                head, _, tail = rest.partition(".")
                rest = f"{rename.get(head, head)}.{tail}"
            out[f"{new}.{rest}"] = value
    return out


def _ldm_unet(state, config) -> dict:
    """diffusers UNet2DConditionModel keys -> the original openaimodel layout (model.diffusion_model.*)."""
    per, levels = config["layers_per_block"], len(config["block_out_channels"])
    pairs = [("conv_in", "input_blocks.0.0", None), ("time_embedding.linear_1", "time_embed.0", None),
             ("time_embedding.linear_2", "time_embed.2", None), ("conv_norm_out", "out.0", None),
             ("conv_out", "out.2", None), ("mid_block.resnets.0", "middle_block.0", _LDM_RESNET),
             ("mid_block.attentions.0", "middle_block.1", None), ("mid_block.resnets.1", "middle_block.2", _LDM_RESNET)]
    for level in range(levels):
        for j in range(per):
            i = 1 + level * (per + 1) + j
            pairs += [(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{i}.0", _LDM_RESNET),
                      (f"down_blocks.{level}.attentions.{j}", f"input_blocks.{i}.1", None)]
        if level < levels - 1:
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{1 + level * (per + 1) + per}.0.op", None))
    for level in range(levels):
        attention = any(k.startswith(f"up_blocks.{level}.attentions.") for k in state)
        for j in range(per + 1):
            i = level * (per + 1) + j
            pairs += [(f"up_blocks.{level}.resnets.{j}", f"output_blocks.{i}.0", _LDM_RESNET),
                      (f"up_blocks.{level}.attentions.{j}", f"output_blocks.{i}.1", None)]
        if level < levels - 1:
            pairs.append((f"up_blocks.{level}.upsamplers.0.conv",
                          f"output_blocks.{level * (per + 1) + per}.{2 if attention else 1}.conv", None))
    out = {}
    for old, new, rename in pairs:
        out.update(_moved(state, old, f"model.diffusion_model.{new}", rename))
    assert len(out) == len(state)
    return out


def _ldm_vae(state, config) -> dict:
    """diffusers AutoencoderKL keys -> the original layout (first_stage_model.*; attention as 1x1 convs)."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    resnet = {"conv_shortcut": "nin_shortcut"}
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    pairs = [("quant_conv", "quant_conv", None), ("post_quant_conv", "post_quant_conv", None)]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in", None), (f"{part}.conv_out", f"{part}.conv_out", None),
                  (f"{part}.conv_norm_out", f"{part}.norm_out", None),
                  (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", resnet),
                  (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", resnet)]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", None),
                  (f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", None),
                  (f"decoder.up_blocks.{i}.resnets", f"decoder.up.{n - 1 - i}.block", None),
                  (f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv", None)]
    out = {}
    for old, new, rename in pairs:
        out.update({k.replace("conv_shortcut", "nin_shortcut"): v for k, v in _moved(state, old, new, rename).items()})
    for part in ("encoder", "decoder"):
        for key, value in _moved(state, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", attention).items():
            out[key.replace("proj_out.0.", "proj_out.")] = value[..., None, None] if value.dim() == 2 else value
    assert len(out) == len(state)
    return {f"first_stage_model.{k}": v for k, v in out.items()}


def _open_clip(state, hidden: int) -> dict:
    """Our (transformers-layout) text encoder -> OpenCLIP keys as in SD 2.x files, plus a 2nd layer SD drops."""
    out = {"cond_stage_model.model.token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "cond_stage_model.model.positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "cond_stage_model.model.ln_final.weight": state["text_model.final_layer_norm.weight"],
           "cond_stage_model.model.ln_final.bias": state["text_model.final_layer_norm.bias"],
           "cond_stage_model.model.text_projection": torch.eye(hidden)}
    for layer in (0, 1):  # layer 1: a copy standing for the last OpenCLIP layer, which SD 2.x never uses
        old, new = "text_model.encoder.layers.0.", f"cond_stage_model.model.transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{new}attn.in_proj_{kind}"] = torch.cat([state[f"{old}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{new}attn.out_proj.{kind}"] = state[f"{old}self_attn.out_proj.{kind}"]
            for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                 ("mlp.fc2", "mlp.c_proj")):
                out[f"{new}{theirs}.{kind}"] = state[f"{old}{ours}.{kind}"]
    return out


@pytest.mark.parametrize("text_layout", ["clip", "open_clip"])
def test_an_original_single_file_loads_through_diffusers_converters(tmp_path, text_layout):
    arch = ARCHS["tiny"]
    torch.manual_seed(5)
    models = build_models(arch)
    state = {**_ldm_unet(models["unet"].state_dict(), arch["unet"]), **_ldm_vae(models["vae"].state_dict(), arch["vae"])}
    text = models["text_encoder"].state_dict()
    if text_layout == "clip":  # SD 1.x: transformers' CLIP under cond_stage_model.transformer.
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
    else:
        state.update(_open_clip(text, arch["text_encoder"]["hidden_size"]))
    path = save_safetensors(state, tmp_path / "tiny-sd.safetensors")
    settings = {k: v for k, v in TINY.items() if k != "pretrained"}
    loaded = bench.create_backbone("sd", checkpoint=path, seed=5, **settings)
    reference = bench.create_backbone("sd", **{**TINY, "seed": 5})
    images = _images()
    assert loaded.weights_sha256() == bench.hub.sha256_file(path)
    assert _equal(loaded.extract(images), reference.extract(images))
    del state["model.diffusion_model.out.2.bias"]  # conv_out of the UNet
    save_safetensors(state, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match=r"cut\.safetensors \(unet\).*missing key 'conv_out\.bias'"):
        bench.create_backbone("sd", checkpoint=tmp_path / "cut.safetensors", **settings)
