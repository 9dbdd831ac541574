"""Run results: one JSON per (backbone, weights, dataset, split seed), written atomically.

Layout under the results root (``--out``, default ``reports/``)::

    runs/<dataset>/<backbone label>/seed<k>.json      (the split's file lists included)

A file exists only once its run finished: runs are skipped when their JSON exists, and a run that
was killed leaves none and is simply done again (reusing cached features).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

SCHEMA = "bench.run/1"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file in the same folder and ``os.replace``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.json"
        >>> write_json_atomic(p, {"x": 1}); json.loads(p.read_text())
        {'x': 1}
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to ``path`` atomically (temporary file + ``os.replace``).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.md"
        >>> write_text_atomic(p, "hi"); p.read_text()
        'hi'
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_path(out: Path, dataset: str, label: str, seed: int | str) -> Path:
    """Where the result of one run lives.

    Example:
        >>> run_path(Path("reports"), "cat_15", "ddpm", 0).as_posix()
        'reports/runs/cat_15/ddpm/seed0.json'
    """
    return Path(out) / "runs" / dataset / label / f"seed{seed}.json"


def iter_results(out: Path) -> Iterator[dict]:
    """Every finished run result under ``out/runs`` (files of other schemas are skipped).

    Example:
        >>> list(iter_results(Path("/nonexistent")))
        []
    """
    root = Path(out) / "runs"
    if not root.exists():
        return
    for path in sorted(root.rglob("seed*.json")):
        data = json.loads(path.read_text())
        if data.get("schema") == SCHEMA:
            data["_path"] = str(path)
            yield data


def _git_sha() -> str:
    try:
        repo = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes).

    Example:
        >>> peak_rss_bytes() > 0
        True
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def provenance(device: str) -> dict[str, Any]:
    """Versions, git sha, host and device: what a reader needs to trust a number.

    Example:
        >>> "torch" in provenance("cpu")["versions"]
        True
    """
    import numpy
    import torch

    import bench

    return {
        "versions": {
            "bench": bench.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
        },
        "git_sha": _git_sha(),
        "host": platform.node(),
        "platform": platform.platform(),
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "",
        "torch_threads": torch.get_num_threads(),
    }
