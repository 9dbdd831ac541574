"""Collate run results into the paper's Table 2 shape: rows backbones, columns datasets.

Each cell is the mean ± sample standard deviation (n-1) of the mIoU over the re-split seeds found,
in percent. The released split is never averaged into the re-splits: it has a column of its own
(the spec asks for it to be always reported). The paper's value and the delta (percentage points)
appear only where they mean something: the official mIoU, of a result computed with the official
weights that the paper's number was measured with (not a user's ``--weights``, not a random-init
control). Results of different configurations under one label (``config_key``) are never averaged
together: each gets its own row. Markdown by default; CSV and LaTeX on request.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.results import iter_results

# The paper's column order; any other dataset (demo, a user's own) follows alphabetically.
PAPER_ORDER = ["bedroom_28", "ffhq_34", "cat_15", "horse_21", "celeba_19", "ade_bedroom_30"]


def _paper_value(arch: str, tag: str | None, dataset: str, pretrained: bool, weights_source: str = "official",
                 weights_sha256: str = "") -> tuple[float, float] | None:
    if not pretrained or tag is None or weights_source != "official":
        return None
    from bench.errors import BenchError
    from bench.registry import get_backbone_class

    try:
        weights = get_backbone_class(arch).weights
    except BenchError:  # a result from a plugin that is not installed here
        return None
    entry = weights.get(tag)
    if entry is None or (entry.sha256 and weights_sha256 and entry.sha256.lower() != weights_sha256.lower()):
        return None  # not the file the paper's number was measured with
    value = entry.paper_miou.get(dataset)
    return tuple(value) if value else None


def collect(out: Path, variant: str = "official") -> pd.DataFrame:
    """One row per (backbone, dataset, split kind, config): n seeds, mean, std (percent), paper, delta.

    Example:
        >>> collect(Path("/nonexistent")).empty
        True
    """
    columns = ["backbone", "dataset", "split", "config_key", "n", "mean", "std", "paper_mean", "paper_std", "delta"]
    rows = [
        {
            "backbone": r["backbone"], "arch": r.get("arch", r["backbone"]), "tag": r.get("tag"),
            "pretrained": r.get("pretrained", True), "dataset": r["dataset"], "split": r.get("split", "resplit"),
            "seed": r["seed"], "config_key": r.get("config_key", ""),
            "weights_source": r.get("weights_source", ""),
            "weights_sha256": r.get("provenance", {}).get("weights_sha256", ""),
            "miou": 100.0 * r["miou"][variant],
            # a result that is not a backbone's (a synthetic-data baseline) carries its own paper value,
            # attached by its writer only under the paper's conditions
            "paper_miou": tuple(r["paper_miou"]) if r.get("paper_miou") else None,
        }
        for r in iter_results(out)
    ]
    if not rows:
        return pd.DataFrame(columns=columns)
    df = pd.DataFrame(rows)
    table = []
    for (backbone, dataset, split, config_key), g in df.groupby(
            ["backbone", "dataset", "split", "config_key"], sort=False):
        first = g.iloc[0]
        paper = None
        if variant == "official":  # the paper reports the official metric only
            paper = first["paper_miou"] or _paper_value(first["arch"], first["tag"], dataset,
                                                        bool(first["pretrained"]), first["weights_source"],
                                                        first["weights_sha256"])
        mean = g["miou"].mean()
        table.append({
            "backbone": backbone, "dataset": dataset, "split": split, "config_key": config_key, "n": len(g),
            "mean": mean, "std": g["miou"].std(ddof=1) if len(g) > 1 else float("nan"),
            "paper_mean": paper[0] if paper else float("nan"),
            "paper_std": paper[1] if paper else float("nan"),
            "delta": mean - paper[0] if paper else float("nan"),
        })
    out_df = pd.DataFrame(table, columns=columns)
    # One label, several configurations (e.g. seeds run before and after a change): say which row is which.
    clash = out_df.groupby(["backbone", "dataset", "split"])["config_key"].transform("nunique") > 1
    out_df.loc[clash, "backbone"] = out_df.loc[clash].apply(
        lambda r: f"{r['backbone']} [config {r['config_key'][:8]}]", axis=1)
    return out_df


def _dataset_order(names) -> list[str]:
    names = list(dict.fromkeys(names))
    return [d for d in PAPER_ORDER if d in names] + sorted(d for d in names if d not in PAPER_ORDER)


def _titles() -> dict[str, str]:
    from bench.data import list_cards

    return {c.name: c.paper_table or c.title or c.name for c in list_cards()}


def _cell(row: pd.Series, pm: str) -> str:
    if math.isnan(row["std"]):
        text = f"{row['mean']:.1f}"
    else:
        text = f"{row['mean']:.1f} {pm} {row['std']:.1f}"
    if not math.isnan(row["paper_mean"]):
        text += f" (paper {row['paper_mean']:.1f}, Δ {row['delta']:+.1f})"
    return text


def wide_table(df: pd.DataFrame, pm: str = "±") -> pd.DataFrame:
    """Backbones x datasets table of formatted cells (best mean per column is not marked).

    Example:
        >>> wide_table(collect(Path("/nonexistent"))).empty
        True
    """
    if df.empty:
        return pd.DataFrame()
    titles = _titles()
    order = _dataset_order(df["dataset"])
    columns = [(d, split) for d in order for split in ("resplit", "released")
               if ((df["dataset"] == d) & (df["split"] == split)).any()]
    cells = {(r["backbone"], r["dataset"], r["split"]): _cell(r, pm) for _, r in df.iterrows()}
    backbones = list(dict.fromkeys(df.sort_values("mean", ascending=True)["backbone"]))

    def title(d: str, split: str) -> str:
        return titles.get(d, d) + (" (released split)" if split == "released" else "")

    table = pd.DataFrame(
        [[cells.get((b, d, split), "–") for d, split in columns] for b in backbones],
        index=backbones, columns=[title(d, split) for d, split in columns],
    )
    table.index.name = "method"
    return table


def to_markdown(df: pd.DataFrame, variant: str = "official") -> str:
    """Table 2 as Markdown.

    Example:
        >>> to_markdown(collect(Path("/nonexistent"))).startswith("_no results")
        True
    """
    table = wide_table(df)
    if table.empty:
        return "_no results found_\n"
    header = ["method", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in table.iterrows():
        lines.append("| " + " | ".join([str(name), *row.tolist()]) + " |")
    n = sorted(set(df.loc[df["split"] == "resplit", "n"].tolist()))
    lines.append("")
    paper = ("paper values and Δ (percentage points) for results of the official weights the paper used."
             if variant == "official" else "no paper values: the paper reports the official mIoU only.")
    seeds = f"mean ± sample std (n-1) over {', '.join(map(str, n))} re-split seed(s); " if n else ""
    lines.append(f"mIoU ({variant}, %), {seeds}the released split in its own column; {paper}")
    return "\n".join(lines) + "\n"


def to_latex(df: pd.DataFrame, variant: str = "official") -> str:
    """Table 2 as a LaTeX tabular (booktabs).

    Example:
        >>> "tabular" in to_latex(collect(Path("/nonexistent")))
        True
    """
    table = wide_table(df, pm=r"$\pm$")

    def esc(s: str) -> str:
        return s.replace("_", r"\_").replace("%", r"\%").replace("Δ", r"$\Delta$")

    cols = list(table.columns) if not table.empty else []
    lines = [r"\begin{tabular}{l" + "c" * len(cols) + "}", r"\toprule",
             " & ".join(["Method", *map(esc, cols)]) + r" \\", r"\midrule"]
    for name, row in table.iterrows():
        lines.append(" & ".join([esc(str(name)), *(esc(c) for c in row.tolist())]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", f"% mIoU ({variant}, %), mean $\\pm$ sample std over seeds"]
    return "\n".join(lines) + "\n"


def to_csv(df: pd.DataFrame) -> str:
    """One row per backbone x dataset with n, mean, std, paper mean/std and delta (percent).

    Example:
        >>> to_csv(collect(Path("/nonexistent"))).splitlines()[0]
        'backbone,dataset,split,config_key,n,mean,std,paper_mean,paper_std,delta'
    """
    return df.to_csv(index=False, float_format="%.2f")


def render(out: Path, fmt: str = "md", variant: str = "official") -> str:
    """Collect ``out/runs`` and format it (``md``, ``csv`` or ``latex``).

    Example:
        >>> render(Path("/nonexistent"), "md").startswith("_no results")
        True
    """
    df = collect(out, variant)
    if fmt == "md":
        return to_markdown(df, variant)
    if fmt == "csv":
        return to_csv(df)
    if fmt == "latex":
        return to_latex(df, variant)
    from bench.errors import BenchError

    raise BenchError(f"unknown report format {fmt!r}; use md, csv or latex")


# ---- the Markdown page: Table 2 plus every analysis folder -----------------------------------------

#: rows of one CSV shown on the page (the file itself, linked, holds them all)
PAGE_MAX_ROWS = 30


def analysis_folders(out: Path) -> list[Path]:
    """Every analysis output folder under ``out/analyses`` (a folder holding a ``meta.json``), sorted.

    Example:
        >>> analysis_folders(Path("/nonexistent"))
        []
    """
    root = Path(out) / "analyses"
    return sorted(p.parent for p in root.rglob("meta.json")) if root.exists() else []


def _analysis_name(out: Path, folder: Path) -> str:
    """``<out>/analyses/<dataset>/<NAME>/...`` -> NAME."""
    parts = folder.relative_to(Path(out) / "analyses").parts
    return parts[1] if len(parts) > 1 else parts[0]


def _format(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def csv_markdown(path: Path, max_rows: int = PAGE_MAX_ROWS) -> str:
    """A CSV as a Markdown table (floats to 4 significant digits; at most ``max_rows`` rows, then a note).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "t.csv"; _ = p.write_text("a,b\\n1,0.123456\\n")
        >>> print(csv_markdown(p))
        | a | b |
        |---|---|
        | 1 | 0.1235 |
    """
    df = pd.read_csv(path)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    for row in df.head(max_rows).itertuples(index=False):
        lines.append("| " + " | ".join(_format(v) for v in row) + " |")
    if len(df) > max_rows:
        lines.append(f"\n_first {max_rows} of {len(df)} rows; all of them in `{path.name}`_")
    return "\n".join(lines)


def page(out: Path, page_path: Path, variant: str = "official") -> str:
    """The Markdown page: Table 2 of ``out/runs``, then each analysis folder with its meta summary, its
    CSVs as tables and its PNGs linked relative to ``page_path`` (figures are drawn from those CSVs).

    Example:
        >>> page(Path("/nonexistent"), Path("/tmp/page.md")).splitlines()[0]
        '# Results'
    """
    import json
    import os

    from bench.analyses import ANALYSES

    out = Path(out)
    where = Path(page_path).resolve().parent
    lines = ["# Results", "", f"Generated by `bench report --page` from `{out}` (runs and analyses). Every figure "
             "is drawn from the CSV listed with it (`bench report --redraw` redraws them from the files alone).",
             "", "## Table 2: mIoU per backbone and dataset", "", to_markdown(collect(out, variant), variant).rstrip()]
    for folder in analysis_folders(out):
        name = _analysis_name(out, folder)
        rel = folder.relative_to(out / "analyses").as_posix()
        lines += ["", f"## {rel}", ""]
        if name in ANALYSES:
            lines += [f"_{ANALYSES[name][1]}_", ""]
        meta = json.loads((folder / "meta.json").read_text())
        facts = [f"{k}: `{meta[k]}`" for k in ("backbone", "dataset", "seeds", "seed", "blocks", "steps", "k",
                                               "probe", "size_rule", "run_key", "source") if k in meta]
        git = meta.get("provenance", {}).get("git_sha")
        if git:
            facts.append(f"code: `{git[:12]}`")
        if facts:
            lines += ["; ".join(facts), ""]
        def link(path: Path) -> str:
            return Path(os.path.relpath(path.resolve(), where)).as_posix()

        # each figure, then the CSV it was drawn from as a table; other data files as links only
        for png in sorted(folder.glob("*.png")):
            lines += [f"![{rel}/{png.stem}]({link(png)})", ""]
            csv = png.with_suffix(".csv")
            if csv.exists():
                lines += [f"[`{csv.name}`]({link(csv)}): the numbers drawn", "", csv_markdown(csv), ""]
        others = [p for p in sorted(folder.iterdir()) if p.suffix in {".csv", ".npz"} and not p.with_suffix(".png").exists()]
        if others:
            lines += ["more data: " + ", ".join(f"[`{p.name}`]({link(p)})" for p in others), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_page(out: Path, page_path: Path, variant: str = "official") -> Path:
    """Write :func:`page` to ``page_path`` atomically; returns the path."""
    from bench.results import write_text_atomic

    write_text_atomic(Path(page_path), page(out, page_path, variant))
    return Path(page_path)


def redraw_figures(out: Path) -> list[Path]:
    """Redraw the PNGs of every analysis folder from its CSV/NPZ files, through its module's ``redraw``.

    Analyses without a ``redraw`` function are left as they are. Returns the PNGs written.

    Example:
        >>> redraw_figures(Path("/nonexistent"))
        []
    """
    import importlib

    from bench.analyses import ANALYSES

    written: list[Path] = []
    for folder in analysis_folders(out):
        name = _analysis_name(out, folder)
        if name not in ANALYSES:
            continue
        module = importlib.import_module(ANALYSES[name][0])
        if hasattr(module, "redraw"):
            written += [p for p in module.redraw(folder) if p.suffix == ".png"]
    return written
