"""Fig. 9-10: `bench analyze classes` (class statistics by hand count, per-class IoU from result JSONs)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.analyses import classes
from bench.cli import main
from bench.results import SCHEMA

# A made-up 3-class dataset (ignore 255) of 4x4 labels, counted by hand below.
TRAIN = [np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [255, 0, 0, 0]]),  # 0:7 1:4 2:4 ignore:1
         np.array([[1] * 4] * 4)]                                                 # 1:16
TEST = [np.array([[0] * 4, [0] * 4, [0] * 4, [0, 0, 2, 2]])]                       # 0:14 2:2


def dataset(root: Path) -> Path:
    for part, labels in (("train", TRAIN), ("test", TEST)):
        (root / part).mkdir(parents=True)
        for i, label in enumerate(labels):
            Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(root / part / f"im{i}.png")
            np.save(root / part / f"im{i}.npy", label.astype(np.uint8))
    (root / "card.json").write_text(json.dumps({"name": "toy", "classes": ["a", "b", "c"], "ignore_label": 255}))
    return root


def test_class_statistics_equal_hand_counts():
    df = classes.class_statistics(TRAIN, ["a", "b", "c"], 255)
    assert df["class_id"].tolist() == [0, 1, 2, 255]
    assert df["pixels"].tolist() == [7, 20, 4, 1]
    assert df["images"].tolist() == [1, 2, 1, 1]
    assert df["pixel_share"].tolist() == pytest.approx([7 / 32, 20 / 32, 4 / 32, 1 / 32])
    assert df["image_share"].tolist() == pytest.approx([0.5, 1.0, 0.5, 0.5])
    # an ignore id that is one of the classes gets no extra row; an id outside the classes is refused
    assert classes.class_statistics(TRAIN[1:], ["a", "b"], 0)["class_id"].tolist() == [0, 1]
    with pytest.raises(Exception, match="label id 3 outside"):
        classes.class_statistics([np.array([[3]])], ["a", "b", "c"], 255)


def result(backbone: str, seed, ious: list, split: str = "resplit", config_key: str = "k1") -> dict:
    return {"schema": SCHEMA, "run_key": f"{backbone}{seed}{config_key}", "config_key": config_key,
            "backbone": backbone, "dataset": "toy", "split": split, "seed": seed,
            "per_class_iou": {"class_ids": [0, 1, 2], "class_names": ["a", "b", "c"], "official": ious,
                              "standard": [None if v == 0 else v for v in ious]}}


def test_classes_writes_statistics_and_per_class_iou_bars(tmp_path, capsys):
    root = dataset(tmp_path / "toy")
    out = tmp_path / "out"
    runs = out / "runs" / "toy"
    for label, seed, ious in [("net", 0, [0.5, 0.2, 0.0]), ("net", 1, [0.7, 0.4, 0.2]), ("base", 0, [0.1, 0.1, 0.1])]:
        path = runs / label / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result(label, seed, ious)))
    assert main(["analyze", "classes", "--dataset", str(root), "--out", str(out)]) == 0
    folder = out / "analyses" / "toy" / "classes"
    stats = pd.read_csv(folder / "class_stats.csv")
    train = stats[stats["part"] == "train"]
    test = stats[stats["part"] == "test"]
    assert train["pixels"].tolist() == [7, 20, 4, 1] and train["images"].tolist() == [1, 2, 1, 1]
    assert test["pixels"].tolist() == [14, 0, 2, 0] and test["images"].tolist() == [1, 0, 1, 0]
    iou = pd.read_csv(folder / "per_class_iou.csv")
    net = iou[iou["backbone"] == "net"]
    assert net["iou_mean"].tolist() == pytest.approx([60.0, 30.0, 10.0])
    assert net["iou_std"].tolist() == pytest.approx([np.std([50, 70], ddof=1)] * 3)
    assert net["n"].tolist() == [2, 2, 2] and set(iou["backbone"]) == {"net", "base"}
    assert (folder / "per_class_iou.png").stat().st_size > 0 and (folder / "class_stats.png").stat().st_size > 0
    meta = json.loads((folder / "meta.json").read_text())
    assert len(meta["results"]) == 3 and len(meta["dataset_content"]) == 32
    # standard variant: a class absent from both is left out of the mean (None), not counted as 0
    assert main(["analyze", "classes", "--dataset", str(root), "--out", str(out), "--backbone", "net",
                 "--variant", "standard"]) == 0
    std = pd.read_csv(folder / "per_class_iou.csv")
    assert std["iou_mean"].tolist() == pytest.approx([60.0, 30.0, 20.0]) and std["n"].tolist() == [2, 2, 1]


def test_configurations_and_released_split_are_never_averaged_together(tmp_path):
    results = [result("net", 0, [1.0, 1.0, 1.0], config_key="k1"), result("net", 1, [0.0, 0.0, 0.0], config_key="k2"),
               result("net", None, [0.5, 0.5, 0.5], split="released", config_key="k1")]
    df = classes.per_class_iou(results)
    assert sorted(set(df["backbone"])) == ["net (released split)", "net [config k1]", "net [config k2]"]
    assert (df["n"] == 1).all()


def test_unknown_backbone_label_fails_in_one_line(tmp_path, capsys):
    root = dataset(tmp_path / "toy")
    assert main(["analyze", "classes", "--dataset", str(root), "--out", str(tmp_path), "--backbone", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no results for backbone 'nope'" in err
