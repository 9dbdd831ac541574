"""DeepLabV3 (baselines spec §4, C12): the torchvision model offline, ImageNet init, training, selection."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from baselines.deeplab import build_deeplab, load_imagenet_backbone, preprocess
from baselines.deeplab_train import DeepLabConfig, evaluate, select_and_evaluate, select_epoch, train_deeplab
from bench.errors import BenchError, CheckpointError

MANIFEST = Path(__file__).parent / "fixtures" / "manifests" / "torchvision_deeplabv3_resnet101_nc29.json"


def _listing(model):
    return [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]


def test_c12_resnet101_equals_the_manifest_offline():
    got = _listing(build_deeplab(29, device="meta"))
    want = json.loads(MANIFEST.read_text())
    assert got == want
    assert len(got) == 668 and sum(int(np.prod(s)) for _, s, _ in got) == 58_742_092


def test_c12_the_class_count_changes_only_classifier_4():
    a, b = dict((k, s) for k, s, _ in _listing(build_deeplab(29, device="meta"))), \
        dict((k, s) for k, s, _ in _listing(build_deeplab(34, device="meta")))
    assert list(a) == list(b)
    assert sorted(k for k in a if a[k] != b[k]) == ["classifier.4.bias", "classifier.4.weight"]


def test_output_shape_of_the_small_variant():
    out = build_deeplab(9, "small").eval()(torch.zeros(2, 3, 64, 64))["out"]
    assert out.shape == (2, 9, 64, 64)


def test_bad_arch_is_a_one_line_error():
    with pytest.raises(BenchError, match="resnet101, small"):
        build_deeplab(9, "resnet18")


def test_c12_the_imagenet_file_loads_strictly_into_the_backbone(tmp_path):
    model = build_deeplab(29, device="meta")
    with torch.device("meta"):
        from torchvision.models import resnet101

        keys = resnet101().state_dict()
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in keys.items()}
    state["conv1.weight"].fill_(0.25)
    for k in [k for k in state if k.endswith("num_batches_tracked")][:3]:
        del state[k]  # older files lack some: filled with 0
    path = tmp_path / "resnet101-63fe2227.pth"
    torch.save(state, path)
    model = build_deeplab(29)
    load_imagenet_backbone(model, path)
    assert float(model.backbone.conv1.weight.detach().mean()) == 0.25
    assert float(model.backbone.bn1.running_var.mean()) == 0.0  # came from the file (init is 1)

    bad = dict(state)
    del bad["layer3.5.conv2.weight"]
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match="layer3.5.conv2.weight"):
        load_imagenet_backbone(build_deeplab(29), path)
    bad = dict(state, extra_head=torch.zeros(3))
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match="extra_head"):
        load_imagenet_backbone(build_deeplab(29), path)


def test_a_malicious_imagenet_file_is_refused(tmp_path):
    from helpers import WritesMarker

    marker = tmp_path / "pwned"
    path = tmp_path / "resnet101.pth"
    torch.save({"conv1.weight": torch.zeros(1), "evil": WritesMarker(marker)}, path)
    with pytest.raises(CheckpointError):
        load_imagenet_backbone(build_deeplab(29), path)
    assert not marker.exists()


def test_the_small_variant_refuses_imagenet_weights(tmp_path):
    with pytest.raises(BenchError, match="random"):
        load_imagenet_backbone(build_deeplab(9, "small"), tmp_path / "x.pth")


def test_preprocess_is_imagenet_normalisation():
    x = preprocess(np.full((1, 1, 1, 3), 255, np.uint8))
    assert torch.allclose(x.flatten(), (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


class _Toy:
    """20 samples of 16 px: left half class 1, right half class 2 (plus noise in the image)."""

    def __init__(self, n=20):
        rng = np.random.default_rng(0)
        self.items = []
        for _ in range(n):
            label = np.zeros((16, 16), np.uint8)
            label[:, :8], label[:, 8:] = 1, 2
            image = (rng.random((16, 16, 3)) * 40).astype(np.uint8)
            image[:, :8] += 150
            self.items.append((image, label))
        self.reads = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.reads += 1
        return self.items[i]


def test_c12_one_epoch_drops_the_last_batch_and_writes_the_official_name(tmp_path):
    data = _Toy(20)
    torch.manual_seed(0)
    paths = train_deeplab(build_deeplab(3, "small"), data, tmp_path / "dl", DeepLabConfig(arch="small", epochs=1),
                          progress=False)
    assert [p.name for p in paths] == ["deeplab_epoch_0.pth"] and paths[0].exists()
    assert data.reads == 16  # 20 samples, batch 8: two steps, the last 4 dropped
    state = torch.load(paths[0], weights_only=True)
    assert set(state) == {"model_state_dict", "optimizer_state_dict", "generator_state", "rng_state", "epoch"}
    assert state["optimizer_state_dict"]["state"][0]["step"].item() == 2


def test_an_interrupted_training_resumes_bit_identical(tmp_path):
    def fresh():
        torch.manual_seed(0)
        return build_deeplab(3, "small")

    straight = train_deeplab(fresh(), _Toy(), tmp_path / "a", DeepLabConfig(arch="small", epochs=2), progress=False)
    train_deeplab(fresh(), _Toy(), tmp_path / "b", DeepLabConfig(arch="small", epochs=1), progress=False)
    resumed = train_deeplab(fresh(), _Toy(), tmp_path / "b", DeepLabConfig(arch="small", epochs=2), progress=False)
    a = torch.load(straight[-1], weights_only=True)["model_state_dict"]
    b = torch.load(resumed[-1], weights_only=True)["model_state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_c12_selection_orders_and_the_all_zero_case():
    scores = {e: 0.1 for e in range(20)}
    scores[2] = scores[10] = 0.5
    assert select_epoch(scores) == 2
    assert select_epoch(scores, "lexicographic") == 10  # visited 0, 1, 10, 11, ..., 19, 2, ...
    assert select_epoch({0: 0.2, 1: 0.3}) == 1
    with pytest.raises(BenchError, match="every validation mIoU is 0"):
        select_epoch({0: 0.0, 1: 0.0})


def test_evaluate_counts_and_select_and_evaluate_reports_the_chosen_epoch(tmp_path):
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return {"out": self.bias.view(1, 3, 1, 1).expand(x.shape[0], 3, *x.shape[2:])}

    image = np.zeros((2, 2, 3), np.uint8)
    gt = np.array([[1, 1], [2, 255]])
    model = Fixed()
    with torch.no_grad():
        model.bias[1] = 1.0  # predicts class 1 everywhere
    cm = evaluate(model, [(image, gt)], num_classes=3, ignore_label=255)
    assert cm.counts[1, 1] == 2 and cm.counts[2, 1] == 1
    paths = []
    for e, cls in enumerate([2, 1]):
        m = Fixed()
        with torch.no_grad():
            m.bias[cls] = 1.0
        paths.append(tmp_path / f"deeplab_epoch_{e}.pth")
        torch.save({"model_state_dict": m.state_dict()}, paths[-1])
    out = select_and_evaluate(Fixed, paths, [(image, gt)], [(image, gt)], num_classes=3, ignore_label=255,
                              class_ids=[0, 1, 2])
    assert out["best_epoch"] == 1 and out["val_miou"][1] > out["val_miou"][0]
    assert out["test"]["per_class_standard"][0] is None  # class 0 absent from GT and prediction


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_amp_and_workers_train(tmp_path):
    torch.manual_seed(0)
    paths = train_deeplab(build_deeplab(3, "small"), _Toy(), tmp_path / "dl",
                          DeepLabConfig(arch="small", epochs=1, amp=True, workers=2), device="cuda", progress=False)
    assert paths[0].exists()
