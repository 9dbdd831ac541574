"""Table 7: `bench analyze mlp` (probe width/depth variants from one feature extraction)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from bench.analyses import mlp
from bench.cli import main
from bench.errors import BenchError


def test_variants_map_to_hidden_widths():
    assert mlp.hidden_for("original", 9) == (128, 32) and mlp.hidden_for("original", 34) == (256, 128)
    assert mlp.hidden_for("wider", 9) == (256, 64) and mlp.hidden_for("wider", 34) == (512, 256)
    assert mlp.hidden_for("deeper", 9) == (128, 128, 32, 32)
    assert mlp.hidden_for("64x16", 9) == (64, 16) and mlp.hidden_for("8", 9) == (8,)
    for bad in ("big", "0x4", "x"):
        with pytest.raises(BenchError, match="neither original, wider, deeper nor hidden widths"):
            mlp.hidden_for(bad, 9)


def test_mlp_on_the_demo_trains_the_requested_layer_sizes_from_one_extraction(tmp_path):
    argv = ["analyze", "mlp", "--backbone", "pixels", "--dataset", "demo", "--out", str(tmp_path),
            "--variants", "original,wider,deeper,16x8", "--max-train", "2", "--max-test", "2", "--members", "2",
            "--max-steps", "10", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    folder = tmp_path / "analyses" / "demo" / "mlp"
    table = pd.read_csv(folder / "mlp.csv")
    assert table["variant"].tolist() == ["original", "wider", "deeper", "16x8"]
    assert table["hidden"].tolist() == ["128x32", "256x64", "128x128x32x32", "16x8"]
    assert table["official_mean"].between(0, 100).all() and table["paper_mean"].isna().all()
    runs = pd.read_csv(folder / "mlp_runs.csv")
    # read back from the trained ensembles: 5 pixel features in, 9 demo classes out
    assert runs["layers"].tolist() == ["5-128-32-9", "5-256-64-9", "5-128-128-32-32-9", "5-16-8-9"]
    linear = lambda a, b: a * b + b  # noqa: E731
    assert runs["params_per_member"].tolist() == [  # Linear weights and biases + BatchNorm weight and bias
        linear(5, 128) + linear(128, 32) + linear(32, 9) + 2 * (128 + 32),
        linear(5, 256) + linear(256, 64) + linear(64, 9) + 2 * (256 + 64),
        linear(5, 128) + linear(128, 128) + linear(128, 32) + linear(32, 32) + linear(32, 9) + 2 * (128 + 128 + 32 + 32),
        linear(5, 16) + linear(16, 8) + linear(8, 9) + 2 * (16 + 8)]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["runs"][0]["extracted_images"] == 4  # once for all variants
    assert meta["variants"] == {"original": [128, 32], "wider": [256, 64], "deeper": [128, 128, 32, 32], "16x8": [16, 8]}
    assert main(argv) == 0
    assert json.loads((folder / "meta.json").read_text())["runs"][0]["extracted_images"] == 0


def test_deeper_builds_four_hidden_layers_and_zero_widths_are_refused_before_any_work(tmp_path, capsys):
    from bench.probe import EnsembleMLP

    ens = EnsembleMLP(in_dim=5, num_classes=9, members=2, hidden=mlp.hidden_for("deeper", 9), seeds=[0, 1])
    assert mlp.layer_sizes(ens) == [5, 128, 128, 32, 32, 9]
    assert ens(torch.zeros(2, 3, 5)).shape == (2, 3, 9) and ens.eval().predict(torch.zeros(4, 5))[0].shape == (2, 4)
    assert main(["analyze", "mlp", "--backbone", "pixels", "--dataset", "demo", "--out", str(tmp_path),
                 "--variants", "original,0x4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'0x4' is neither" in err
    assert not (tmp_path / "analyses").exists()
