"""Fig. 5 panels: palette and colours of known label maps, the numbers behind a panel, bench run --save-masks."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import helpers

from bench import demo, metrics
from bench.analyses import masks
from bench.cards import get_card
from bench.runner import RunSpec, run


def test_palette_and_colours_of_a_known_label_map():
    card = get_card("demo")
    palette = masks.class_palette(card)
    assert palette.shape == (9, 3) and palette.dtype == np.uint8
    assert np.array_equal(palette, demo.colourise(np.arange(9)[None])[0])  # the demo's own preview colours
    label = np.array([[0, 1, 255], [8, 8, 3]])
    rgb = masks.colour_labels(label, palette)
    assert rgb.shape == (2, 3, 3)
    assert rgb[0, 0].tolist() == palette[0].tolist() and rgb[1, 2].tolist() == palette[3].tolist()
    assert rgb[0, 2].tolist() == list(masks.IGNORE_COLOUR)  # the ignore label is grey
    many = masks.class_palette_for(40, "")
    assert len({tuple(c) for c in many.tolist()}) == 40  # a large card still gets distinct colours


def test_panels_hold_the_numbers_they_draw(tmp_path):
    card = get_card("demo")
    gts = np.zeros((2, 8, 8), dtype=np.int64)
    gts[0, :4] = 1
    gts[1, :, :2] = 255
    preds = gts.copy()
    preds[0, 0, :] = 2  # 8 of 64 pixels wrong in image 0
    preds[1] = 0
    js = np.zeros((2, 8, 8), dtype=np.float32)
    js[0, 0, :] = 0.5
    images = np.full((2, 8, 8, 3), 200, dtype=np.uint8)
    written = masks.write_panels(tmp_path, images, gts, preds, js, ["a", "b"], card, {"run_key": "k"}, "t")
    assert {p.name for p in written} == {"masks.npz", "masks.csv", "masks.png"}
    stats = pd.read_csv(tmp_path / "masks.csv")
    assert stats["pixel_accuracy"].tolist() == [56 / 64, 1.0]  # image b: the 16 ignore pixels do not count
    assert stats["mean_js"].tolist() == pytest.approx([8 * 0.5 / 64, 0.0])
    assert stats["image_uncertainty"].tolist() == pytest.approx([0.5, 0.0])  # top 6 of 64 pixels are all 0.5
    saved = np.load(tmp_path / "masks.npz")
    assert np.array_equal(saved["preds"], preds) and np.array_equal(saved["gts"], gts)
    assert np.array_equal(saved["palette"], masks.class_palette(card))
    assert json.loads((tmp_path / "meta.json").read_text())["images"] == ["a", "b"]
    (tmp_path / "masks.png").unlink()
    masks.redraw(tmp_path)
    assert (tmp_path / "masks.png").stat().st_size > 0


def test_run_save_masks_draws_the_run_own_predictions_without_changing_its_key(tmp_path):
    spec = RunSpec("pixels", "demo", seed=0, out=tmp_path, progress=False, max_train=2, max_test=3, members=2,
                   save_masks=3)
    result = run(spec)
    folder = tmp_path / "analyses" / "demo" / "masks" / "pixels" / "seed0"
    saved = np.load(folder / "masks.npz")
    assert saved["preds"].shape == (3, 64, 64) and saved["images"].shape == (3, 64, 64, 3)
    # the panels are the run's own predictions: they give back the run's mIoU
    cm = metrics.ConfusionMatrix(9, 255)
    for pred, gt in zip(saved["preds"], saved["gts"]):
        cm.update(pred, gt)
    assert cm.miou("official", list(range(9))) == pytest.approx(result["miou"]["official"], abs=1e-12)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["run_key"] == result["run_key"]
    # the same run without masks has the same key: it is reused, not refused as another configuration
    spec.save_masks = 0
    again = run(spec)
    assert again["run_key"] == result["run_key"] and again["miou"] == result["miou"]


def test_run_option_and_analyze_masks_equal_the_run(tmp_path):
    from bench.cli import _run_specs, build_parser

    argv = ["run", "--backbone", "pixels", "--seeds", "0", "--save-masks", "2"]
    assert [s.save_masks for s in _run_specs(build_parser(argv).parse_args(argv))] == [2]
    argv = ["analyze", "masks", "--backbone", "pixels", "--dataset", "demo", "--seeds", "0", "--members", "2",
            "--max-train", "2", "--max-test", "2", "--images", "2", "--out", str(tmp_path), "--device", "cpu",
            "--no-progress"]
    assert masks.main(build_parser(argv).parse_args(argv)) == 0
    meta = json.loads((tmp_path / "analyses/demo/masks/pixels/seed0/meta.json").read_text())
    # the same ensemble as the run: same features, member seeds and probe settings, hence the same number
    result = run(RunSpec("pixels", "demo", seed=0, out=tmp_path / "run", progress=False, max_train=2, max_test=2,
                         members=2))
    assert meta["run_key"] == result["run_key"]
    assert meta["miou"]["official"] == pytest.approx(result["miou"]["official"], abs=1e-12)


def test_a_second_masks_run_reads_the_cached_features(tmp_path, monkeypatch):
    from backbones.pixels import Pixels
    from bench.cli import build_parser

    seen = helpers.count_images_through(monkeypatch, Pixels)
    argv = ["analyze", "masks", "--backbone", "pixels", "--dataset", "demo", "--seeds", "0", "--members", "2",
            "--max-train", "2", "--max-test", "2", "--images", "2", "--out", str(tmp_path), "--device", "cpu",
            "--no-progress"]
    assert masks.main(build_parser(argv).parse_args(argv)) == 0
    meta = tmp_path / "analyses/demo/masks/pixels/seed0/meta.json"
    first = json.loads(meta.read_text())["miou"]
    assert sum(seen) == 4  # 2 train + 2 test images
    seen.clear()
    assert masks.main(build_parser(argv).parse_args(argv)) == 0
    assert seen == [] and json.loads(meta.read_text())["miou"] == first
