"""MAE ViT-L/8 backbone: architecture vs the manifest, official checkpoint container, safe loading, features."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import bench
from backbones.mae import TINY_ARCH, VITL8_ARCH, build_encoder, convert_mae_checkpoint
from bench.checkpoints import check_state_dict
from bench.errors import CheckpointError
from bench.hub import sha256_file
from helpers import WritesMarker

MANIFESTS = Path(__file__).parent / "fixtures" / "manifests"




def _manifest(name: str) -> list[tuple[str, list[int], str]]:
    return [tuple(entry) for entry in json.loads((MANIFESTS / f"{name}.json").read_text())]


def _decoder_entries(embed: int, patch: int, tokens: int) -> dict[str, torch.Tensor]:
    """The extra entries of an MAE autoencoder state dict (decoder and mask token), shapes as in MAE."""
    dec = 2 * embed
    return {
        "mask_token": torch.zeros(1, 1, dec),
        "decoder_pos_embed": torch.zeros(1, tokens + 1, dec),
        "decoder_embed.weight": torch.zeros(dec, embed), "decoder_embed.bias": torch.zeros(dec),
        "decoder_blocks.0.norm1.weight": torch.ones(dec), "decoder_blocks.0.attn.qkv.weight": torch.zeros(3 * dec, dec),
        "decoder_norm.weight": torch.ones(dec), "decoder_norm.bias": torch.zeros(dec),
        "decoder_pred.weight": torch.zeros(patch * patch * 3, dec), "decoder_pred.bias": torch.zeros(patch * patch * 3),
    }


def _tiny_encoder_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    encoder = build_encoder({**VITL8_ARCH, **TINY_ARCH})
    with torch.no_grad():  # timm starts biases and norms at constants: randomise so a mix-up shows
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {k: v.clone() for k, v in encoder.state_dict().items()}


def _save_official(path: Path, encoder_state: dict[str, torch.Tensor], args: object) -> None:
    """The container of MAE's util/misc.save_model: full autoencoder under 'model', plus training state."""
    tokens = (TINY_ARCH["img_size"] // TINY_ARCH["patch_size"]) ** 2
    model = {**encoder_state, **_decoder_entries(TINY_ARCH["embed_dim"], TINY_ARCH["patch_size"], tokens)}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "epoch": 149,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args}, path)


def _reference_maps(state: dict[str, torch.Tensor], x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    """MAE's forward_encoder at mask ratio 0, written out: patches + position, a random token shuffle
    (MAE's masking step), class token prepended, blocks, then un-shuffle and drop the class token."""
    torch.manual_seed(123)
    encoder = build_encoder({**VITL8_ARCH, **TINY_ARCH}).eval()
    encoder.load_state_dict(state)
    patch = TINY_ARCH["patch_size"]
    grid = x.shape[-1] // patch
    with torch.no_grad():
        tokens = encoder.patch_embed.proj(x).flatten(2).transpose(1, 2) + encoder.pos_embed[:, 1:]
        order = torch.randperm(tokens.shape[1])
        restore = torch.argsort(order)
        tokens = tokens[:, order]
        cls = encoder.cls_token + encoder.pos_embed[:, :1]
        h = torch.cat([cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        out = []
        for i, block in enumerate(encoder.blocks):
            h = block(h)
            if i in blocks:
                patches = h[:, 1:][:, restore]  # raster order again: token k -> row k // grid, column k % grid
                out.append(patches.transpose(1, 2).reshape(x.shape[0], -1, grid, grid))
    return out


def test_full_size_architecture_matches_the_manifest():
    bb = bench.create_backbone("mae", pretrained=False, device="meta")
    assert bb.num_features == 12288 and bb.input_size == 256
    assert [(f.name, f.channels, f.stride) for f in bb.feature_info] == [(f"block{b}", 1024, 8) for b in range(12, 24)]
    with torch.device("meta"):
        encoder = build_encoder(VITL8_ARCH)
    manifest = _manifest("mae_vitl8_256_encoder")
    assert [(k, list(v.shape), str(v.dtype)[6:]) for k, v in encoder.state_dict().items()] == [
        (k, s, d) for k, s, d in manifest]
    # The official container holds the whole autoencoder: after dropping decoder and mask token it fits.
    official = {k: torch.empty(s, device="meta") for k, s, _ in manifest}
    official.update({k: v.to("meta") for k, v in _decoder_entries(1024, 8, 1024).items()})
    check_state_dict(encoder, convert_mae_checkpoint(official), source="mae_full_size_keys")


def test_official_container_with_training_args_loads(tmp_path):
    state = _tiny_encoder_state()
    path = tmp_path / "lsun_cat.pth"
    _save_official(path, state, argparse.Namespace(model="mae_vit_large_patch8", mask_ratio=0.75, input_size=256,
                                                   norm_pix_loss=True, device="cuda", output_dir="./out"))
    bb = bench.create_backbone("mae", checkpoint=path, arch=TINY_ARCH, blocks=[1, 3])
    assert bb.tag is None and bb.weights_sha256() == sha256_file(path)

    x = torch.randn(2, 3, 64, 64)
    maps = bb.forward_features(x)
    expected = _reference_maps(state, x, [1, 3])
    assert [tuple(m.shape) for m in maps] == [(2, 32, 8, 8)] * 2
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_official_tag_with_local_file_keeps_the_tag(tmp_path):
    path = tmp_path / "ffhq.pth"
    _save_official(path, _tiny_encoder_state(), argparse.Namespace(epochs=400))
    bb = bench.create_backbone("mae.ffhq", checkpoint=path, arch=TINY_ARCH)
    assert bb.tag == "ffhq" and bb.weights_entry.paper_miou["ffhq_34"] == (58.8, 1.1)


def test_malicious_pickle_in_the_mae_container_is_refused(tmp_path):
    probe = tmp_path / "probe_marker"
    _save_official(tmp_path / "probe.pth", _tiny_encoder_state(), WritesMarker(probe))
    torch.load(tmp_path / "probe.pth", weights_only=False)  # the payload really runs on an unsafe load
    assert probe.exists()

    marker = tmp_path / "marker"
    _save_official(tmp_path / "evil.pth", _tiny_encoder_state(), WritesMarker(marker))
    with pytest.raises(CheckpointError, match=r"evil\.pth.*exec.*nothing from the file was executed"):
        bench.create_backbone("mae", checkpoint=tmp_path / "evil.pth", arch=TINY_ARCH)
    assert not marker.exists()


def test_checkpoint_that_does_not_fit_names_the_first_mismatch(tmp_path):
    state = _tiny_encoder_state()
    del state["blocks.2.attn.proj.weight"]
    _save_official(tmp_path / "cut.pth", state, argparse.Namespace())
    with pytest.raises(CheckpointError, match=r"cut\.pth.*missing key 'blocks\.2\.attn\.proj\.weight' "
                                              r"\(expected shape \(32, 32\)\)"):
        bench.create_backbone("mae", checkpoint=tmp_path / "cut.pth", arch=TINY_ARCH)
    # The tiny file against the full ViT-L/8 (24 blocks): one message with the first missing block key.
    _save_official(tmp_path / "tiny.pth", _tiny_encoder_state(), argparse.Namespace())
    with pytest.raises(CheckpointError, match=r"tiny\.pth does not fit the model: missing key "
                                              r"'blocks\.4\.norm1\.weight' \(expected shape \(1024,\)\)"):
        bench.create_backbone("mae", checkpoint=tmp_path / "tiny.pth")


def test_preprocess_normalises_and_resizes_to_the_model_size():
    bb = bench.create_backbone("mae", pretrained=False, arch=TINY_ARCH)
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    images[:, 1] = 255
    x = bb.preprocess(images)
    assert tuple(x.shape) == (1, 3, 64, 64)
    torch.testing.assert_close(x[0, :, 10, 10], torch.tensor([-0.485 / 0.229, (1 - 0.456) / 0.224, -0.406 / 0.225]))
    with pytest.raises(bench.BenchError, match="uint8"):
        bb.preprocess(images.float())


@pytest.mark.parametrize("blocks, message", [([4], "block 4 is out of range; valid blocks are 0..3"),
                                             ([1, 1], "lists 1 twice"), ([], "non-empty")])
def test_invalid_blocks_are_errors(blocks, message):
    with pytest.raises(bench.BenchError, match=message):
        bench.create_backbone("mae", pretrained=False, device="meta", arch=TINY_ARCH, blocks=blocks)


def test_unknown_arch_key_is_an_error():
    with pytest.raises(bench.BenchError, match=r"unknown key\(s\) \['patch'\]"):
        bench.create_backbone("mae", pretrained=False, device="meta", arch={"patch": 16})
