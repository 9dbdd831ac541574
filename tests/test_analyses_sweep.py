"""bench analyze sweep: one extraction for all blocks x steps, one probe per cached map, the numbers behind the heat-maps."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import helpers
from bench import features
from bench.analyses import _common, sweep
from bench.cli import build_parser
from bench.hub import cache_dir
from bench.runner import RunSpec, plan, run

BLOCKS, STEPS = [6, 8], [50, 150]


def _args(out: Path, *extra: str):
    argv = ["analyze", "sweep", "--backbone", "ddpm", "--dataset", "demo", "--blocks", ",".join(map(str, BLOCKS)),
            "--steps", ",".join(map(str, STEPS)), "--seeds", "0", "--members", "2", "--max-train", "2",
            "--max-test", "2", "--out", str(out), "--device", "cpu", "--no-progress", *extra]
    return build_parser(argv).parse_args(argv)


@pytest.fixture
def forward_calls(monkeypatch):
    """Counts the images that go through the DDPM's forward pass (every extraction, whoever asks)."""
    from backbones.ddpm import DDPM

    return helpers.count_images_through(monkeypatch, DDPM)


def test_sweep_extracts_once_trains_one_probe_per_cell_and_reuses_the_cache(tmp_path, forward_calls):
    out = tmp_path / "r"
    assert sweep.main(_args(out)) == 0
    folder = out / "analyses" / "demo" / "sweep"
    # ONE extraction: 4 images (2 train + 2 test), every block and step in the same forward passes
    assert sum(forward_calls) == 4
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["runs"][0]["extraction"]["images_extracted"] == 4
    assert meta["runs"][0]["backbone_config"]["blocks"] == BLOCKS and meta["runs"][0]["backbone_config"]["steps"] == STEPS

    cells = pd.read_csv(folder / "cells.csv")
    assert len(cells) == len(BLOCKS) * len(STEPS)
    assert sorted(zip(cells.block, cells.step)) == sorted((b, s) for b in BLOCKS for s in STEPS)
    assert cells["miou"].between(0, 1).all() and cells["miou_small"].between(0, 1).all()
    assert (cells["channels"] == 64).all()  # one demo-model map per probe (blocks 6 and 8: 64 channels)
    for stem, column in (("sweep", "miou"), ("sweep_small", "miou_small"), ("sweep_large", "miou_large")):
        grid = pd.read_csv(folder / f"{stem}.csv")
        assert (folder / f"{stem}.png").stat().st_size > 0
        assert len(grid) == len(BLOCKS) * len(STEPS) and (grid["n"] == 1).all()
        merged = grid.merge(cells, on=["block", "step"])
        assert (merged["miou_x"] - merged["miou_y" if column == "miou" else column]).abs().max() < 1e-12  # the heat-map holds the cells' numbers

    # small/large: the group mIoU is the mean IoU over the classes the rule put in it
    classes = pd.read_csv(folder / "classes.csv")
    assert abs(classes["share"].sum() - 1) < 1e-9
    assert ((classes["share"] <= classes["median_share"]) == (classes["group"] == "small")).all()
    per_class = pd.read_csv(folder / "cells_per_class.csv")
    cell = per_class[(per_class.block == 8) & (per_class.step == 50)].merge(classes[["class_id", "group"]], on="class_id")
    row = cells[(cells.block == 8) & (cells.step == 50)].iloc[0]
    assert abs(cell.loc[cell.group == "small", "iou"].mean() - row["miou_small"]) < 1e-12
    assert abs(cell.loc[cell.group == "large", "iou"].mean() - row["miou_large"]) < 1e-12

    # a second sweep: nothing extracted, every cell reused (same key), the same numbers
    forward_calls.clear()
    assert sweep.main(_args(out)) == 0
    assert forward_calls == []
    assert json.loads((folder / "meta.json").read_text())["runs"][0]["extraction"]["images_extracted"] == 0
    pd.testing.assert_frame_equal(pd.read_csv(folder / "cells.csv"), cells)
    # other probe settings: the cells are trained again, but still from the cache
    assert sweep.main(_args(out, "--max-steps", "40")) == 0
    assert forward_calls == []
    again = pd.read_csv(folder / "cells.csv")
    assert len(again) == 4 and not again["miou"].equals(cells["miou"])


def test_a_cell_equals_a_run_of_that_single_map(tmp_path, forward_calls):
    """The (8, 50) cell == `bench run --set blocks=8 --set steps=50` given the same features; and the map the
    sweep selects is that single-map backbone's own extraction up to fp16 rounding of batched-conv noise."""
    out = tmp_path / "r"
    assert sweep.main(_args(out)) == 0
    cells = pd.read_csv(out / "analyses" / "demo" / "sweep" / "cells.csv")
    cell = cells[(cells.block == 8) & (cells.step == 50)].iloc[0]

    wide = _common.prepare(RunSpec("ddpm", "demo", seed=0, members=2, max_train=2, max_test=2, progress=False,
                                   out=out, backbone_kwargs={"blocks": BLOCKS, "steps": STEPS}))
    index = _common.map_indices(wide.feature_names, ["t50.b8"])[0]
    single_spec = RunSpec("ddpm", "demo", seed=0, members=2, max_train=2, max_test=2, progress=False,
                          out=tmp_path / "direct", backbone_kwargs={"blocks": [8], "steps": [50]})
    single = _common.prepare(single_spec)  # its own extraction
    for image_id in wide.plan.content.values():
        a, b = wide.store.load(image_id)[index].float(), single.store.load(image_id)[0].float()
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=2e-3, atol=1e-3)  # at most an fp16 ulp apart
        assert (a != b).float().mean() < 0.01

    # the run, reading the sweep's map from its cache: exactly the sweep's number
    p = plan(single_spec)
    store = features.FeatureStore(cache_dir("features") / "copied", {**p.backbone_config, "fit": "stretch"},
                                  p.card.resolution)
    for image_id in wide.plan.content.values():
        store.put(image_id, [wide.store.load(image_id)[index].permute(2, 0, 1)])
    single_spec.cache = cache_dir("features") / "copied"
    forward_calls.clear()
    result = run(single_spec)
    assert forward_calls == []  # it read the copied maps
    assert result["miou"]["official"] == pytest.approx(cell["miou"], abs=1e-12)


def test_bad_block_fails_before_any_work(tmp_path, forward_calls):
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="block"):
        sweep.main(_args(tmp_path, "--blocks", "99"))
    assert forward_calls == []
