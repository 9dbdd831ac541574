"""Figures with the numbers behind them: every PNG is written next to the CSV it was drawn from.

A figure must be reproducible from results alone, so the pattern is: compute a DataFrame, save it
(``NAME.csv``), draw the figure from that DataFrame only, save it (``NAME.png``). Both writes are
atomic. matplotlib is imported here (never at ``import bench``) and always with the Agg backend, so
drawing works on a headless box.

Example:
    >>> import pandas as pd, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> df = pd.DataFrame({"x": [1, 2], "y": [3.0, 4.0]})
    >>> fig, ax = new_figure()
    >>> _ = ax.plot(df.x, df.y)
    >>> sorted(p.name for p in save_figure(fig, df, d / "curve"))
    ['curve.csv', 'curve.png']
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (headless)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def new_figure(width: float = 6.0, height: float = 4.0, **kwargs: Any) -> tuple[Any, Any]:
    """A figure and its axes (``plt.subplots``) on the Agg backend.

    Example:
        >>> fig, ax = new_figure(3, 2)
        >>> [float(v) for v in fig.get_size_inches()]
        [3.0, 2.0]
    """
    return pyplot().subplots(figsize=(width, height), **kwargs)


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig: Any, data: pd.DataFrame | None, stem: Path, dpi: int = 120) -> list[Path]:
    """Write ``stem.png`` (and ``stem.csv`` from ``data``, the numbers drawn), atomically; close ``fig``.

    Returns the paths written (CSV first).
    """
    stem = Path(stem)
    written: list[Path] = []
    if data is not None:
        csv = stem.with_suffix(".csv")
        _atomic_write(csv, lambda tmp: data.to_csv(tmp, index=False))
        written.append(csv)
    png = stem.with_suffix(".png")
    fig.tight_layout()
    _atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    pyplot().close(fig)
    written.append(png)
    return written


def paper_bars(table: pd.DataFrame, ticks: list[str], title: str, paper_label: str,
               paper_errors: bool = True) -> Any:
    """Bars of our mIoU (``official_mean`` ± ``official_std``) per row, the paper's beside them where known.

    Example:
        >>> t = pd.DataFrame({"official_mean": [40.0], "official_std": [1.0], "paper_mean": [float("nan")],
        ...                   "paper_std": [float("nan")]})
        >>> paper_bars(t, ["a"], "demo", "paper").axes[0].get_title()
        'demo'
    """
    import numpy as np

    fig, ax = new_figure(5.0, 3.6)
    x = np.arange(len(table))
    has_paper = table["paper_mean"].notna().any()
    width = 0.4 if has_paper else 0.6
    ax.bar(x - (width / 2 if has_paper else 0), table["official_mean"], width, yerr=table["official_std"].fillna(0),
           capsize=3, label="ours (official mIoU)")
    if has_paper:
        errors = dict(yerr=table["paper_std"].fillna(0), capsize=3) if paper_errors else {}
        ax.bar(x + width / 2, table["paper_mean"], width, label=paper_label, **errors)
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig
