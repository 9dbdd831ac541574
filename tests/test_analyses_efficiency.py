"""Table 4: `bench analyze efficiency` (one extraction per seed, one probe per training-set size)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from bench.analyses import efficiency
from bench.cli import main
from bench.errors import BenchError


def test_sizes_default_to_tens_and_the_full_count_and_are_checked():
    assert efficiency.default_sizes(40) == [10, 20, 30, 40]
    assert efficiency.default_sizes(30) == [10, 20, 30]
    assert efficiency.default_sizes(4) == [4]
    assert efficiency.parse_sizes("4, 2,2", 5) == [2, 4]
    for bad in ("0", "6", "a", ""):
        with pytest.raises(BenchError, match="--sizes"):
            efficiency.parse_sizes(bad, 5)


def test_efficiency_on_the_demo_uses_nested_prefixes_and_reuses_features(tmp_path):
    argv = ["analyze", "efficiency", "--backbone", "pixels", "--dataset", "demo", "--out", str(tmp_path),
            "--sizes", "2,5", "--seeds", "0,1", "--max-train", "5", "--max-test", "2", "--members", "2",
            "--max-steps", "10", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    folder = tmp_path / "analyses" / "demo" / "efficiency"
    table = pd.read_csv(folder / "efficiency.csv")
    assert table["size"].tolist() == [2, 5] and table["n_seeds"].tolist() == [2, 2]
    assert table["official_mean"].between(0, 100).all() and table["official_std"].notna().all()
    assert table["paper_mean"].isna().all()  # no paper value for the demo
    runs = pd.read_csv(folder / "efficiency_runs.csv")
    assert len(runs) == 4 and runs[["miou_official", "miou_standard"]].stack().between(0, 100).all()
    for seed, g in runs.groupby("seed"):  # the mean over seeds is what the table shows
        assert g["size"].tolist() == [2, 5]
    assert table.loc[0, "official_mean"] == pytest.approx(runs[runs["size"] == 2]["miou_official"].mean())
    meta = json.loads((folder / "meta.json").read_text())
    for run in meta["runs"]:
        train = run["files"]["train"]
        prefixes = run["training_prefixes"]
        assert prefixes["2"] == train[:2] and prefixes["5"] == train[:5]  # the stated prefixes, nested
    # 5 train + 2 test extracted once for all sizes; seed 1 re-splits the same pool, so only its new images
    assert meta["runs"][0]["extracted_images"] == 7
    seen = {f for part in meta["runs"][0]["files"].values() for f in part}
    assert meta["runs"][1]["extracted_images"] == len({f for part in meta["runs"][1]["files"].values()
                                                       for f in part} - seen)
    # more pixels for more images: the training set grew as stated
    for _, g in runs.groupby("seed"):
        assert g["num_train_pixels"].is_monotonic_increasing and g["num_train_pixels"].iloc[0] < g["num_train_pixels"].iloc[1]
    assert meta["runs"][0]["files"]["train"] != meta["runs"][1]["files"]["train"]  # seeds re-split
    assert main(argv) == 0
    meta = json.loads((folder / "meta.json").read_text())
    assert [r["extracted_images"] for r in meta["runs"]] == [0, 0]  # re-run: features from the cache
    assert pd.read_csv(folder / "efficiency_runs.csv")["miou_official"].tolist() == runs["miou_official"].tolist()


def test_a_size_above_the_training_count_fails_in_one_line(tmp_path, capsys):
    argv = ["analyze", "efficiency", "--backbone", "pixels", "--dataset", "demo", "--out", str(tmp_path),
            "--sizes", "9", "--max-train", "3", "--max-test", "1", "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "each size must be 1..3" in err


def test_paper_values_attach_only_to_the_papers_method_under_its_conditions():
    from types import SimpleNamespace

    from bench.analyses._paper import paper_applies

    def prep(backbone="ddpm", tag="lsun_bedroom", dataset="bedroom_28", members=10, kwargs=None,
             source="official", pretrained=True, max_train=None):
        spec = SimpleNamespace(backbone=backbone, pretrained=pretrained, members=members, max_train=max_train,
                               max_test=None, backbone_kwargs=kwargs if kwargs is not None else {"seed": 0})
        plan = SimpleNamespace(spec=spec, card=SimpleNamespace(name=dataset), weights_source=source,
                               backbone_config={"tag": tag, "weights_sha256": ""})
        return SimpleNamespace(plan=plan)

    args = SimpleNamespace(max_steps=None, weights=None)
    assert paper_applies(prep(), args)
    assert paper_applies(prep(kwargs={"seed": 0, "noise_mode": "per_step"}), args, own_options=("noise_mode",))
    assert not paper_applies(prep(kwargs={"seed": 0, "noise_mode": "per_step"}), args)
    assert not paper_applies(prep(kwargs={"blocks": [6]}), args)  # not the paper's features
    assert not paper_applies(prep(members=2), args)
    assert not paper_applies(prep(), SimpleNamespace(max_steps=100, weights=None))
    assert not paper_applies(prep(source="user"), args) and not paper_applies(prep(pretrained=False), args)
    assert not paper_applies(prep(max_train=5), args)
    assert not paper_applies(prep(backbone="mae"), args)  # official weights, but another method (45.0)
    assert not paper_applies(prep(dataset="demo", tag="demo"), args)
