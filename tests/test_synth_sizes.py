"""Table 6: mIoU against synthetic set size, from result files to the CSV behind the curve."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from baselines.size_curve import collect_sizes, size_curve
from bench.results import SCHEMA, run_path, write_json_atomic


def _result(out: Path, label: str, seed: int, size: int, miou: float, *, lr: float = 1e-3, paper=None) -> None:
    data = {"schema": SCHEMA, "run_key": f"{label}-{seed}-{size}-{lr}", "backbone": f"{label}@{size}",
            "arch": label, "dataset": "demo", "seed": seed, "miou": {"official": miou, "standard": miou + 0.01},
            "synthetic": {"max_data": size, "kept": size - size // 10},
            "model": {"kind": "deeplab"}, "paper_miou": paper,
            "key_parts": {"max_data": size, "kept": "x", "files": seed, "split": seed, "lr": lr}}
    write_json_atomic(run_path(out, "demo", f"{label}@{size}" + ("" if lr == 1e-3 else "-lr"), seed), data)


def test_the_curve_is_drawn_from_the_results_mean_and_sample_std_per_size(tmp_path):
    for seed, (a, b) in enumerate([(0.30, 0.40), (0.34, 0.46)]):
        _result(tmp_path, "datasetddpm", seed, 1000, a)
        _result(tmp_path, "datasetddpm", seed, 2000, b, paper=[45.1, 2.3] if seed == 0 else None)
    _result(tmp_path, "datasetddpm", 0, 1000, 0.90, lr=1e-4)  # another configuration: its own line
    table = collect_sizes(tmp_path, "demo")
    main = table[table.n == 2].set_index("size")
    assert list(main.index) == [1000, 2000]
    assert math.isclose(main.loc[1000, "mean"], 32.0) and math.isclose(main.loc[1000, "std"], 2 ** 0.5 * 2)
    assert math.isclose(main.loc[2000, "mean"], 43.0) and main.loc[2000, "paper_mean"] == 45.1
    assert math.isnan(main.loc[1000, "paper_mean"])
    other = table[table.n == 1]
    assert len(other) == 1 and math.isclose(other["mean"].iloc[0], 90.0)
    assert table["config"].nunique() == 2  # never pooled across configurations

    written = size_curve(tmp_path, "demo")
    folder = tmp_path / "analyses" / "demo" / "synth_sizes"
    assert {p.name for p in written} == {"table6.csv", "table6.png", "meta.json"}
    csv = pd.read_csv(folder / "table6.csv")
    assert sorted(csv["mean"].round(6)) == sorted(table["mean"].round(6))
    assert (folder / "table6.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # standard variant: no paper values
    assert collect_sizes(tmp_path, "demo", "standard")["paper_mean"].isna().all()


def test_no_synthetic_results_means_no_figure(tmp_path):
    write_json_atomic(run_path(tmp_path, "demo", "ddpm", 0), {"schema": SCHEMA, "backbone": "ddpm", "dataset": "demo",
                                                              "seed": 0, "miou": {"official": 0.5, "standard": 0.5}})
    assert size_curve(tmp_path, "demo") == []
    assert not (tmp_path / "analyses").exists()
