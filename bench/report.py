"""Collate run results into the paper's Table 2 shape: rows backbones, columns datasets.

Each cell is the mean ± sample standard deviation (n-1) of the official mIoU over the seeds found,
in percent, with the paper's value and the delta in percentage points when the backbone's weights
table has one for that dataset. Markdown by default; CSV (one row per backbone x dataset, every
number in its own column) and LaTeX on request.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.results import iter_results

# The paper's column order; any other dataset (demo, a user's own) follows alphabetically.
PAPER_ORDER = ["bedroom_28", "ffhq_34", "cat_15", "horse_21", "celeba_19", "ade_bedroom_30"]


def _paper_value(arch: str, tag: str | None, dataset: str, pretrained: bool) -> tuple[float, float] | None:
    if not pretrained or tag is None:
        return None
    from bench.errors import BenchError
    from bench.registry import get_backbone_class

    try:
        weights = get_backbone_class(arch).weights
    except BenchError:  # a result from a plugin that is not installed here
        return None
    entry = weights.get(tag)
    value = entry.paper_miou.get(dataset) if entry else None
    return tuple(value) if value else None


def collect(out: Path, variant: str = "official") -> pd.DataFrame:
    """One row per (backbone, dataset): n seeds, mean, std (percent), paper mean/std, delta.

    Example:
        >>> collect(Path("/nonexistent")).empty
        True
    """
    rows = [
        {
            "backbone": r["backbone"], "arch": r.get("arch", r["backbone"]), "tag": r.get("tag"),
            "pretrained": r.get("pretrained", True), "dataset": r["dataset"], "seed": r["seed"],
            "miou": 100.0 * r["miou"][variant],
        }
        for r in iter_results(out)
    ]
    if not rows:
        return pd.DataFrame(columns=["backbone", "dataset", "n", "mean", "std", "paper_mean", "paper_std", "delta"])
    df = pd.DataFrame(rows)
    table = []
    for (backbone, dataset), g in df.groupby(["backbone", "dataset"], sort=False):
        first = g.iloc[0]
        paper = _paper_value(first["arch"], first["tag"], dataset, bool(first["pretrained"]))
        mean = g["miou"].mean()
        table.append({
            "backbone": backbone, "dataset": dataset, "n": len(g), "mean": mean,
            "std": g["miou"].std(ddof=1) if len(g) > 1 else float("nan"),
            "paper_mean": paper[0] if paper else float("nan"),
            "paper_std": paper[1] if paper else float("nan"),
            "delta": mean - paper[0] if paper else float("nan"),
        })
    return pd.DataFrame(table)


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
    cells = {(r["backbone"], r["dataset"]): _cell(r, pm) for _, r in df.iterrows()}
    backbones = list(dict.fromkeys(df.sort_values("mean", ascending=True)["backbone"]))
    table = pd.DataFrame(
        [[cells.get((b, d), "–") for d in order] for b in backbones],
        index=backbones, columns=[titles.get(d, d) for d in order],
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
    n = sorted(set(df["n"].tolist()))
    lines.append("")
    lines.append(
        f"mIoU ({variant}, %), mean ± sample std (n-1) over {', '.join(map(str, n))} seed(s); "
        "paper values and Δ (percentage points) where the weights table has them."
    )
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
        'backbone,dataset,n,mean,std,paper_mean,paper_std,delta'
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
