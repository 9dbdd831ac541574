"""SwAV RN50 / RN50w2 backbones: architecture vs the manifests, official containers, safe loading, features."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bench
from backbones._resnet import ResNet50
from backbones.swav import convert_swav_checkpoint
from bench.checkpoints import check_state_dict
from bench.errors import CheckpointError
from bench.hub import sha256_file
from helpers import WritesMarker

MANIFESTS = Path(__file__).parent / "fixtures" / "manifests"
#: protocol section 4: channels@resolution of the hooked block inputs for ResNet-50 at 256 px
RN50_INPUTS_256 = [(64, 64), (256, 64), (256, 64), (512, 32), (512, 32), (1024, 16), (1024, 16), (1024, 16), (2048, 8)]
HOOKED = ["layer1.0", "layer1.2", "layer2.0", "layer2.2", "layer3.0", "layer3.2", "layer3.4", "layer4.0", "layer4.2"]




def _manifest(name: str) -> list[list]:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def _heads(base: int) -> dict[str, torch.Tensor]:
    """SwAV's training heads as they sit next to the trunk (projection MLP and prototypes)."""
    out = base * 32
    return {"projection_head.0.weight": torch.randn(64, out), "projection_head.0.bias": torch.randn(64),
            "projection_head.1.running_mean": torch.zeros(64), "projection_head.3.weight": torch.randn(16, 64),
            "prototypes.weight": torch.randn(30, 16)}


def _trained_trunk(base: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny trunk with non-trivial BatchNorm statistics (so train vs eval mode would show)."""
    torch.manual_seed(seed)
    net = ResNet50(base)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn_like(t) * 0.1)
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name, manifest, factor", [("swav", "swav_rn50_backbone", 1),
                                                    ("swav_w2", "swav_rn50w2_backbone", 2)])
def test_full_size_architecture_matches_the_manifest(name, manifest, factor):
    bb = bench.create_backbone(name, pretrained=False, device="meta")
    assert bb.num_features == 6720 * factor
    assert bb.model.training is False
    expected = _manifest(manifest)
    assert [[k, list(v.shape), str(v.dtype)[6:]] for k, v in bb.model.state_dict().items()] == expected
    maps = bb.forward_features(torch.empty(1, 3, 256, 256, device="meta"))
    shapes = [(c * factor, r) for c, r in RN50_INPUTS_256]
    assert [(m.shape[1], m.shape[2]) for m in maps] == shapes
    assert [(f.channels, 256 // f.stride) for f in bb.feature_info] == shapes
    assert [f.name for f in bb.feature_info] == [f"{b}.input" for b in HOOKED]
    # The official container (DDP keys + heads) fits the full-size trunk after the documented handling.
    official = {"module." + k: torch.empty(s, device="meta") for k, s, _ in expected}
    official.update({"module." + k: v.to("meta") for k, v in _heads(64 * factor).items()})
    check_state_dict(bb.model, convert_swav_checkpoint(official), source=f"{name}_full_size_keys")


def _reference_inputs(state: dict[str, torch.Tensor], x: torch.Tensor, base: int) -> list[torch.Tensor]:
    """Block inputs captured the way the official extractor does: forward pre-hooks on a full forward."""
    net = ResNet50(base).eval()
    net.load_state_dict(state)
    captured: list[torch.Tensor] = []
    for name in HOOKED:
        net.get_submodule(name).register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = stage(h)
    return captured


@pytest.mark.parametrize("container", ["training_state", "raw_imagenet", "plain_safetensors"])
def test_official_containers_load_and_features_match_hooks(tmp_path, container):
    trunk = _trained_trunk()
    ddp = {"module." + k: v for k, v in {**trunk, **_heads(8)}.items()}
    if container == "training_state":  # ddpm-segmentation's .pth: SwAV's main_swav.py checkpoint
        path = tmp_path / "lsun_horse.pth"
        torch.save({"epoch": 200, "state_dict": ddp, "optimizer": {"state": {}, "param_groups": []},
                    "amp": {"loss_scaler0": {"loss_scale": 1024.0}}}, path)
    elif container == "raw_imagenet":  # SwAV's ImageNet release: the DDP state dict itself
        path = tmp_path / "swav_800ep_pretrain.pth.tar"
        torch.save(ddp, path)
    else:  # a converted trunk, no prefix, no heads
        from bench.checkpoints import save_safetensors

        path = save_safetensors(trunk, tmp_path / "trunk.safetensors")
    bb = bench.create_backbone("swav", checkpoint=path, base=8)
    assert bb.weights_sha256() == sha256_file(path) and bb.tag is None
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, trunk[k]), k

    x = bb.preprocess(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    maps = bb.forward_features(x)
    expected = _reference_inputs(trunk, x, 8)
    assert len(maps) == len(expected) == 9
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want)


def test_eval_mode_features_do_not_depend_on_the_batch(tmp_path):
    # BatchNorm with running statistics: an image's features are the same alone or in a batch.
    torch.save({"state_dict": {"module." + k: v for k, v in _trained_trunk().items()}}, tmp_path / "ck.pth")
    bb = bench.create_backbone("swav_w2", checkpoint=tmp_path / "ck.pth", base=8)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    together = bb.extract(images)
    alone = bb.extract(images[:1])
    for a, b in zip(together, alone):
        torch.testing.assert_close(a[:1], b, rtol=1e-4, atol=1e-4)


def test_malicious_pickle_in_the_swav_container_is_refused(tmp_path):
    state = {"module." + k: v for k, v in _trained_trunk().items()}
    probe = tmp_path / "probe_marker"
    torch.save({"epoch": 1, "state_dict": state, "amp": WritesMarker(probe)}, tmp_path / "probe.pth")
    torch.load(tmp_path / "probe.pth", weights_only=False)  # the payload really runs on an unsafe load
    assert probe.exists()

    marker = tmp_path / "marker"
    torch.save({"epoch": 1, "state_dict": state, "amp": WritesMarker(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth.*exec.*nothing from the file was executed"):
        bench.create_backbone("swav", checkpoint=tmp_path / "evil.pth", base=8)
    assert not marker.exists()


def test_checkpoint_that_does_not_fit_names_the_first_mismatch(tmp_path):
    state = {"module." + k: v for k, v in _trained_trunk().items()}
    del state["module.layer3.4.bn2.running_var"]
    torch.save({"state_dict": state}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"cut\.pth.*missing key 'layer3\.4\.bn2\.running_var' "
                                              r"\(expected shape \(32,\)\)"):
        bench.create_backbone("swav", checkpoint=tmp_path / "cut.pth", base=8)
    # An RN50 file given to the w2 plugin: a named shape mismatch.
    torch.save({"state_dict": {"module." + k: v for k, v in _trained_trunk().items()}}, tmp_path / "rn50.pth")
    with pytest.raises(CheckpointError, match=r"rn50\.pth.*key 'conv1\.weight' has shape \(8, 3, 7, 7\), "
                                              r"expected \(16, 3, 7, 7\)"):
        bench.create_backbone("swav_w2", checkpoint=tmp_path / "rn50.pth", base=16)


@pytest.mark.parametrize("blocks, message", [(["layer5.0"], "'layer5.0' is not a ResNet-50 bottleneck block"),
                                             (["layer2.4"], "'layer2.4' is not"),
                                             (["layer1.0", "layer1.0"], "twice"), ("layer1.0", "non-empty list")])
def test_invalid_blocks_are_errors(blocks, message):
    with pytest.raises(bench.BenchError, match=message):
        bench.create_backbone("swav", pretrained=False, device="meta", blocks=blocks)


def test_weights_table_points_at_the_official_files():
    swav, w2 = bench.get_backbone_class("swav"), bench.get_backbone_class("swav_w2")
    base = "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/models/"
    for tag in ("lsun_bedroom", "ffhq", "lsun_cat", "lsun_horse"):
        assert swav.weights[tag].url == (f"{base}swav_checkpoints/{tag}.pth",)
        assert w2.weights[tag].url == (f"{base}swav_w2_checkpoints/{tag}.pth",)
    # The paper's Table 2 "SwAV" row is the w2 model (ADE std 1.6 from the paper, not the README's 1.0).
    assert w2.weights["lsun_bedroom"].paper_miou == {"bedroom_28": (42.4, 1.7), "ade_bedroom_30": (30.6, 1.6)}
    assert swav.weights["ffhq"].paper_miou == {"ffhq_34": (54.7, 1.4), "celeba_19": (53.2, 1.0)}
