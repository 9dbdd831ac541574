"""DINOv2 (official layout -> timm) and any-timm backbones: naming, sizes, checkpoint loading, safety."""
from __future__ import annotations


import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import bench
from backbones.dinov2 import MODELS, convert_dinov2_checkpoint
from bench.checkpoints import check_state_dict, save_safetensors
from bench.errors import CheckpointError
from bench.hub import sha256_file
from helpers import WritesMarker




# ---- DINOv2 ---------------------------------------------------------------------------------------

def _official_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of Meta's released DINOv2 state dicts (facebookresearch/dinov2 layout, 518 px):
    37 x 37 patch positions + 1 class position, a training-only mask token, 4 register tokens in the
    _reg models, LayerScale gammas, and a fused SwiGLU MLP (w12, w3) with hidden width 4096 in ViT-g."""
    depth, width = {"vits14": (12, 384), "vitb14": (12, 768), "vitl14": (24, 1024), "vitg14": (40, 1536)}[model[:6]]
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, width), "pos_embed": (1, 37 * 37 + 1, width),
                                          "mask_token": (1, width)}
    if model.endswith("_reg"):
        shapes["register_tokens"] = (1, 4, width)
    shapes.update({"patch_embed.proj.weight": (width, 3, 14, 14), "patch_embed.proj.bias": (width,)})
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (width,), b + "norm1.bias": (width,),
                       b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                       b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,), b + "ls1.gamma": (width,),
                       b + "norm2.weight": (width,), b + "norm2.bias": (width,), b + "ls2.gamma": (width,)})
        if model.startswith("vitg14"):
            shapes.update({b + "mlp.w12.weight": (8192, width), b + "mlp.w12.bias": (8192,),
                           b + "mlp.w3.weight": (width, 4096), b + "mlp.w3.bias": (width,)})
        else:
            shapes.update({b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
                           b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,)})
    shapes.update({"norm.weight": (width,), "norm.bias": (width,)})
    return shapes


@pytest.mark.parametrize("model", list(MODELS))
def test_official_layout_converts_to_timm_strictly(model):
    official = {k: torch.empty(s, device="meta") for k, s in _official_shapes(model).items()}
    with torch.device("meta"):
        net = timm.create_model(MODELS[model][0], pretrained=False, dynamic_img_size=True)
    check_state_dict(net, convert_dinov2_checkpoint(official), source=f"dinov2_{model}_keys")
    bb = bench.create_backbone(f"dinov2:{model}", pretrained=False, device="meta")
    depth, width = MODELS[model][1:]
    assert bb.tag == model and [f.name for f in bb.feature_info] == [f"block{b}" for b in range(depth - 4, depth)]
    assert bb.num_features == 4 * width and {f.stride for f in bb.feature_info} == {14}


def _official_state_with_registers() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A random ViT-S/14-reg4 (timm) and the same weights written in Meta's layout."""
    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, dynamic_img_size=True).eval()
    with torch.no_grad():
        for name, p in source.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("gamma") else p + 0.05 * torch.randn_like(p))
    sd = source.state_dict()
    official = {k: v.clone() for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    class_position = 0.1 * torch.randn(1, 1, 384)
    official["cls_token"] = sd["cls_token"] - class_position  # Meta adds pos_embed[:, 0] in the forward
    official["pos_embed"] = torch.cat([class_position, sd["pos_embed"]], dim=1)
    official["register_tokens"] = sd["reg_token"].clone()
    official["mask_token"] = torch.zeros(1, 384)
    return source, official


def test_official_register_checkpoint_loads_and_matches_the_official_forward(tmp_path):
    source, official = _official_state_with_registers()
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official, path)
    bb = bench.create_backbone("dinov2", model="vits14_reg", checkpoint=path, blocks=[0, 1])
    assert bb.weights_sha256() == sha256_file(path)

    x = torch.randn(2, 3, 28, 42)  # a 2 x 3 token grid: the 37 x 37 position table is resampled
    maps = bb.forward_features(x)
    # Meta's forward written out: patches + resampled patch positions; class token + its position;
    # the registers after the class token, without positions; blocks; final norm; drop 1 + 4 tokens.
    with torch.no_grad():
        tokens = torch.nn.functional.conv2d(x, official["patch_embed.proj.weight"], official["patch_embed.proj.bias"],
                                            stride=14).flatten(2).transpose(1, 2)
        positions = resample_abs_pos_embed(official["pos_embed"][:, 1:], new_size=(2, 3), old_size=(37, 37),
                                           num_prefix_tokens=0)
        cls = (official["cls_token"] + official["pos_embed"][:, :1]).expand(2, -1, -1)
        h = torch.cat([cls, official["register_tokens"].expand(2, -1, -1), tokens + positions], dim=1)
        expected = []
        for block in source.blocks[:2]:
            h = block(h)
            expected.append(source.norm(h)[:, 5:].transpose(1, 2).reshape(2, 384, 2, 3))
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_demo_sized_images_round_up_to_the_patch():
    bb = bench.create_backbone("dinov2", **bench.get_backbone_class("dinov2").tiny)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = bb.preprocess(images)
    assert tuple(x.shape) == (2, 3, 70, 70)
    assert [tuple(m.shape) for m in bb.extract(images)] == [(2, 384, 5, 5)] * 2
    assert tuple(bb.preprocess(images[..., :56]).shape[-2:]) == (70, 56)  # no resize along a fitting side
    with pytest.raises(bench.BenchError, match="multiples of 14"):
        bb.forward_features(torch.zeros(1, 3, 64, 64))


def test_dinov2_names_and_errors():
    bb = bench.create_backbone("dinov2.vitb14_reg", pretrained=False, device="meta", blocks=[0, 11], norm=False)
    assert (bb.tag, bb.config()["timm"], bb.num_features) == ("vitb14_reg", "vit_base_patch14_reg4_dinov2", 1536)
    assert bench.create_backbone("dinov2", pretrained=False, device="meta").tag == "vits14"  # default
    with pytest.raises(bench.BenchError, match="no model 'vitl16'; did you mean 'vitl14'"):
        bench.create_backbone("dinov2:vitl16", pretrained=False, device="meta")
    with pytest.raises(bench.BenchError, match="'vitl14' and weights tag 'vitb14' disagree"):
        bench.create_backbone("dinov2.vitb14", model="vitl14", pretrained=False, device="meta")
    with pytest.raises(bench.BenchError, match="block 12 is out of range; valid blocks are 0..11"):
        bench.create_backbone("dinov2", pretrained=False, device="meta", blocks=[12])


def test_malicious_pickle_in_a_dinov2_file_is_refused(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"cls_token": torch.zeros(1, 1, 384), "pos_embed": WritesMarker(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth.*exec.*nothing from the file was executed"):
        bench.create_backbone("dinov2", checkpoint=tmp_path / "evil.pth", blocks=[0])
    assert not marker.exists()


# ---- any timm model -------------------------------------------------------------------------------

def _random_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False).eval()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn_like(t))
    return net


@pytest.mark.parametrize("fmt", ["safetensors", "pth_container"])
def test_timm_checkpoint_loads_strictly_and_gives_the_models_features(tmp_path, fmt):
    source = _random_resnet18()
    if fmt == "safetensors":
        path = save_safetensors(source.state_dict(), tmp_path / "model.safetensors")
    else:
        path = tmp_path / "resnet18.pth"
        torch.save({"state_dict": source.state_dict(), "epoch": 90}, path)
    bb = bench.create_backbone("timm:resnet18", checkpoint=path, out_indices=[1, -2])
    assert [(f.name, f.channels, f.stride) for f in bb.feature_info] == [("layer1", 64, 4), ("layer3", 256, 16)]
    assert bb.weights_sha256() == sha256_file(path)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = bb.preprocess(images)
    with torch.no_grad():
        expected = source.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    for got, want in zip(bb.forward_features(x), expected):
        torch.testing.assert_close(got, want)


def test_timm_checkpoint_errors_name_the_file_and_key(tmp_path):
    sd = _random_resnet18().state_dict()
    del sd["layer2.1.bn1.weight"]
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"cut\.pth.*missing key 'layer2\.1\.bn1\.weight' \(expected shape \(128,\)\)"):
        bench.create_backbone("timm:resnet18", checkpoint=tmp_path / "cut.pth")
    marker = tmp_path / "marker"
    torch.save({"state_dict": {"conv1.weight": WritesMarker(marker)}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth.*exec"):
        bench.create_backbone("timm:resnet18", checkpoint=tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="absent.pth"):
        bench.create_backbone("timm:resnet18", checkpoint=tmp_path / "absent.pth")


def test_timm_pretrained_needs_a_local_checkpoint_and_a_known_model():
    with pytest.raises(bench.BenchError, match=r"timm:resnet18 with pretrained=True needs checkpoint=PATH.*"
                                               r"does not download"):
        bench.create_backbone("timm:resnet18")
    with pytest.raises(bench.BenchError, match="needs a model name"):
        bench.create_backbone("timm", model="", pretrained=False)
    assert bench.create_backbone("timm", pretrained=False, device="meta").config()["model"] == "resnet18"
    with pytest.raises(bench.BenchError, match="no model 'resnet181'; did you mean 'resnet18'"):
        bench.create_backbone("timm", model="resnet181", pretrained=False)
    with pytest.raises(bench.BenchError, match="out_index 5 is out of range; valid out_indices are 0..4"):
        bench.create_backbone("timm:resnet18", pretrained=False, device="meta", out_indices=[5])
    with pytest.raises(bench.BenchError, match="lists 4 twice"):
        bench.create_backbone("timm:resnet18", pretrained=False, device="meta", out_indices=[4, -1])


def test_timm_vit_resizes_to_its_size_and_returns_block_maps():
    bb = bench.create_backbone("timm", model="vit_tiny_patch16_224", pretrained=False, out_indices=[-1])
    assert bb.input_size == 224 and [(f.name, f.channels, f.stride) for f in bb.feature_info] == [("blocks.11", 192, 16)]
    maps = bb.extract(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert [tuple(m.shape) for m in maps] == [(1, 192, 14, 14)]
    assert bb.preprocess(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8))[0, 0, 0, 0].item() == pytest.approx(1.0)
    with pytest.raises(bench.BenchError, match="takes 224 px inputs only; image_size=256"):
        bench.create_backbone("timm:vit_tiny_patch16_224", pretrained=False, device="meta", image_size=256)
    assert bench.create_backbone("timm:resnet18", pretrained=False, device="meta", image_size=96).input_size == 96
