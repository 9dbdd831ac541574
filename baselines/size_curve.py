"""Table 6 (appendix B): mIoU against synthetic set size, as a table and a curve.

Reads the synthetic-data results under ``<out>/runs`` (any result with a ``synthetic`` block), groups
them by method, trained model and set size (``max_data``), averages over split seeds (mean ± sample
std, as every table here) and writes ``<out>/analyses/<dataset>/synth_sizes/table6.{csv,png}`` plus a
``meta.json`` naming the results it was drawn from (their run keys). Results of different
configurations (``config_key`` minus the size) are never pooled: each is its own line. The paper's
Table 6 values are drawn beside ours where the result carries them (official generator, paper recipe).

Example:
    >>> import pathlib, tempfile
    >>> size_curve(pathlib.Path(tempfile.mkdtemp()), "demo")
    []
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from bench.results import iter_results, write_json_atomic


def collect_sizes(out: Path, dataset: str, variant: str = "official") -> pd.DataFrame:
    """One row per (method, model, config, size): n seeds, mean, std (percent), paper mean/std, run keys.

    Example:
        >>> import pathlib, tempfile
        >>> collect_sizes(pathlib.Path(tempfile.mkdtemp()), "demo").empty
        True
    """
    rows = []
    for r in iter_results(out):
        syn = r.get("synthetic")
        if not syn or r.get("dataset") != dataset:
            continue
        parts = {k: v for k, v in r.get("key_parts", {}).items() if k not in ("files", "split", "max_data", "kept")}
        from bench.fingerprint import digest

        rows.append({
            "method": r.get("arch", ""), "model": r.get("model", {}).get("kind", ""),
            "label": re.sub(r"@\d+$", "", r.get("backbone", "")), "config": digest(parts, 8),
            "size": int(syn["max_data"]), "kept": int(syn.get("kept", 0)), "seed": r.get("seed"),
            "miou": 100.0 * r["miou"][variant], "run_key": r.get("run_key", ""),
            "paper": tuple(r["paper_miou"]) if r.get("paper_miou") and variant == "official" else None,
        })
    columns = ["method", "model", "label", "config", "size", "n", "mean", "std", "paper_mean", "paper_std", "run_keys"]
    if not rows:
        return pd.DataFrame(columns=columns)
    df = pd.DataFrame(rows)
    out_rows = []
    for (method, model, label, config, size), g in df.groupby(["method", "model", "label", "config", "size"]):
        paper = next((p for p in g["paper"] if p), None)
        out_rows.append({"method": method, "model": model, "label": label, "config": config, "size": size,
                         "n": len(g), "mean": g["miou"].mean(), "std": g["miou"].std(ddof=1) if len(g) > 1 else float("nan"),
                         "paper_mean": paper[0] if paper else float("nan"),
                         "paper_std": paper[1] if paper else float("nan"),
                         "run_keys": " ".join(sorted(g["run_key"]))})
    return pd.DataFrame(out_rows, columns=columns).sort_values(["label", "config", "size"]).reset_index(drop=True)


def size_curve(out: Path, dataset: str, variant: str = "official") -> list[Path]:
    """Write the Table 6 table and curve for ``dataset`` from the results under ``out``; [] if none."""
    from bench.cards import get_card
    from bench.figures import new_figure, save_figure

    table = collect_sizes(out, dataset, variant)
    if table.empty:
        return []
    name = get_card(dataset).name if dataset else dataset
    folder = Path(out) / "analyses" / name / "synth_sizes"
    fig, ax = new_figure(6, 4)
    for (label, config), g in table.groupby(["label", "config"]):
        tag = label if table.groupby("label")["config"].nunique()[label] == 1 else f"{label} [{config}]"
        line = ax.errorbar(g["size"], g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3, label=tag)
        if g["paper_mean"].notna().any():
            ax.plot(g["size"], g["paper_mean"], linestyle="--", color=line[0].get_color(), label=f"{tag} (paper)")
    ax.set_xlabel("synthetic images (before the uncertainty filter)")
    ax.set_ylabel(f"mIoU {variant} (%)")
    ax.set_title(f"{name}: mIoU against synthetic set size (Table 6)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written = save_figure(fig, table, folder / "table6")
    write_json_atomic(folder / "meta.json", {
        "analysis": "synth_sizes", "paper": "Table 6 (appendix B)", "dataset": name, "variant": variant,
        "drawn_from": sorted(k for keys in table["run_keys"] for k in keys.split()),
    })
    return written + [folder / "meta.json"]
