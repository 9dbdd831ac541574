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
