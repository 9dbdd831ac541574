"""Fig. 6: `bench analyze robustness` (clean probe, corrupted test images cached by content)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bench.analyses import robustness
from bench.cli import main
from bench.errors import BenchError


def picture(size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((size, size, 3)) * 255).astype(np.uint8)


def test_severity_zero_is_the_clean_image_and_every_severity_changes_it():
    img = picture()
    for name in robustness.DEFAULT_CORRUPTIONS:
        clean = robustness.corrupt_image(img, name, 0, seed=3)
        assert clean is not img and np.array_equal(clean, img)
        outs = [robustness.corrupt_image(img, name, s, seed=3) for s in range(1, 6)]
        assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
        assert all(not np.array_equal(o, img) for o in outs), name
        assert not np.array_equal(outs[0], outs[4])  # severity matters


def test_corruption_is_seeded_and_leaves_numpy_global_state_alone():
    img = picture()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = robustness.corrupt_image(img, "gaussian_noise", 3, seed=7)
    assert np.array_equal(np.random.get_state()[1], before)
    assert np.array_equal(a, robustness.corrupt_image(img, "gaussian_noise", 3, seed=7))
    assert not np.array_equal(a, robustness.corrupt_image(img, "gaussian_noise", 3, seed=8))
    i1 = robustness.corrupt_image(img, "impulse_noise", 2, seed=7)  # takes a seed argument of its own
    assert np.array_equal(i1, robustness.corrupt_image(img, "impulse_noise", 2, seed=7))
    assert not np.array_equal(i1, robustness.corrupt_image(img, "impulse_noise", 2, seed=8))


def test_bad_names_severities_and_small_images_fail_in_one_line():
    with pytest.raises(BenchError, match=r"unknown corruption 'rain'"):
        robustness.parse_corruptions("fog,rain")
    assert len(robustness.parse_corruptions("common")) == 15
    with pytest.raises(BenchError, match=r"each severity must be 1\.\.5"):
        robustness.parse_severities("0,3")
    with pytest.raises(BenchError, match=r"at least 32x32 px, got 16x16"):
        robustness.corrupt_image(picture(16), "fog", 1, seed=0)


def test_robustness_on_the_demo_scores_every_condition_and_caches_corrupted_features(tmp_path):
    argv = ["analyze", "robustness", "--backbone", "pixels", "--dataset", "demo", "--out", str(tmp_path),
            "--corruptions", "gaussian_noise,fog", "--severities", "1,5", "--seeds", "0",
            "--max-train", "3", "--max-test", "2", "--members", "2", "--max-steps", "20",
            "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    folder = tmp_path / "analyses" / "demo" / "robustness"
    table = pd.read_csv(folder / "robustness.csv")
    assert table[["corruption", "severity"]].values.tolist() == [
        ["gaussian_noise", 0], ["gaussian_noise", 1], ["gaussian_noise", 5], ["fog", 0], ["fog", 1], ["fog", 5]]
    assert (table["backbone"] == "pixels").all()
    assert table["official_mean"].between(0, 100).all() and table["standard_mean"].between(0, 100).all()
    clean = table[table["severity"] == 0]["official_mean"]
    assert clean.nunique() == 1  # every curve starts at the clean score
    runs = pd.read_csv(folder / "robustness_runs.csv")
    assert len(runs) == 6
    assert runs[runs["severity"] > 0]["miou_official"].ne(clean.iloc[0]).any()  # corrupted inputs change the score
    meta = json.loads((folder / "meta.json").read_text())
    run = meta["runs"][0]
    assert run["extracted_images"] == 5 and run["corrupted_images_extracted"] == 2 * 2 * 2
    assert meta["corruptions"] == ["gaussian_noise", "fog"] and meta["severities"] == [1, 5]
    assert "imagecorruptions" in meta["corruption_package"]
    assert main(argv) == 0  # a re-run extracts nothing and gives the same numbers
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["runs"][0]["extracted_images"] == 0 and meta["runs"][0]["corrupted_images_extracted"] == 0
    assert pd.read_csv(folder / "robustness_runs.csv")["miou_official"].tolist() == runs["miou_official"].tolist()


def test_corrupted_test_set_has_its_own_features(tmp_path):
    from bench.analyses._common import prepare
    from bench.runner import RunSpec

    prep = prepare(RunSpec("pixels", "demo", seed=0, max_train=1, max_test=2, out=tmp_path, progress=False))
    corrupted, extracted = robustness.corrupted_test(prep, robustness.LazyBackbone(prep), "gaussian_noise", 4)
    assert extracted == 2
    for s in prep.plan.test:
        old, new = prep.plan.content[s.id], corrupted.plan.content[s.id]
        assert old != new and corrupted.store.has(new)
        clean_rgb, noisy_rgb = prep.store.load(old)[0][..., :3], corrupted.store.load(new)[0][..., :3]
        assert (clean_rgb.float() - noisy_rgb.float()).abs().max() > 0.05
    train = prep.plan.train[0].id
    assert corrupted.plan.content[train] == prep.plan.content[train]  # training images stay clean
    again, extracted = robustness.corrupted_test(prep, robustness.LazyBackbone(prep), "gaussian_noise", 4)
    assert extracted == 0 and again.plan.content == corrupted.plan.content
