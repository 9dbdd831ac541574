"""bench report --page / --redraw: Table 2 plus every analysis folder; figures redrawn from the results tree alone."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from bench import report
from bench.analyses import _common, masks, sweep
from bench.cards import get_card
from bench.cli import main
from bench.figures import save_figure
from bench.runner import RunSpec, run


def _sweep_folder(out: Path) -> pd.DataFrame:
    """A sweep folder as sweep.main writes it, from hand-made cells (the numbers are what is checked)."""
    folder = _common.output_folder(out, "demo", "sweep")
    cells = pd.DataFrame({"seed": [0, 0, 0, 0, 1, 1, 1, 1], "block": [6, 6, 8, 8] * 2, "step": [50, 150] * 4,
                          "miou": [0.30, 0.20, 0.40, 0.35, 0.32, 0.22, 0.44, 0.31]})
    summary = sweep.summarise(cells, "miou")
    save_figure(sweep.draw_heatmap(summary, "t"), summary, folder / "sweep")
    _common.write_meta(folder, {"analysis": "sweep", "dataset": "demo", "backbone": "ddpm", "seeds": [0, 1]})
    return summary


def test_heatmap_draws_exactly_the_numbers_of_its_csv(tmp_path):
    summary = _sweep_folder(tmp_path)
    csv = pd.read_csv(tmp_path / "analyses" / "demo" / "sweep" / "sweep.csv")
    assert csv[["block", "step", "n"]].values.tolist() == [[6, 50, 2], [6, 150, 2], [8, 50, 2], [8, 150, 2]]
    assert np.allclose(csv["miou"], [0.31, 0.21, 0.42, 0.33])  # means over the two seeds
    fig = sweep.draw_heatmap(csv, "t")
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    assert np.allclose(drawn, [[31, 21], [42, 33]])  # rows blocks 6, 8; columns steps 50, 150; in %
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["21.0", "31.0", "33.0", "42.0"]
    assert summary["miou_std"].notna().all()


def test_page_lists_table2_and_every_analysis_with_working_links_and_redraw(tmp_path):
    out = tmp_path / "reports"
    run(RunSpec("pixels", "demo", seed=0, out=out, progress=False, max_train=2, max_test=2, members=2))
    _sweep_folder(out)
    card = get_card("demo")
    labels = np.zeros((1, 4, 4), dtype=np.int64)
    masks.write_panels(masks.run_folder(out, "demo", "pixels", 0), np.zeros((1, 4, 4, 3), np.uint8), labels, labels,
                       np.zeros((1, 4, 4), np.float32), ["x"], card, {"run_key": "abc"}, "t")

    page_path = tmp_path / "site" / "page.md"
    assert main(["report", "--out", str(out), "--page", str(page_path)]) == 0
    text = page_path.read_text()
    assert "## Table 2" in text and "| pixels |" in text
    assert "## demo/sweep" in text and "## demo/masks/pixels/seed0" in text
    assert "| 6 | 50 | 2 | 0.31 |" in text  # the heat-map's CSV as a table (4 significant digits)
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert any(l.endswith("sweep.png") for l in links) and any(l.endswith("masks.png") for l in links)
    for link in links:  # every figure and CSV link resolves from the page's folder
        assert (page_path.parent / link).resolve().exists(), link

    pngs = [out / "analyses/demo/sweep/sweep.png", out / "analyses/demo/masks/pixels/seed0/masks.png"]
    for png in pngs:
        png.unlink()
    assert main(["report", "--out", str(out), "--redraw"]) == 0
    assert all(png.exists() and png.stat().st_size > 0 for png in pngs)
    assert sorted(p.name for p in report.redraw_figures(out)) == ["masks.png", "sweep.png"]
