"""Run results: one JSON per (backbone label, dataset, split), written atomically.

Layout under the results root (``--out``, default ``reports/``)::

    runs/<dataset>/<backbone label>/seed<k>.json      (or seedreleased.json; file lists included)

Every result carries a ``run_key``: a hash of everything that produced it (dataset content,
split file lists, resolved backbone config with weights sha256, probe config, protocol version;
see :mod:`bench.runner`). A run is skipped only when the file there has the same key. A file of
another key under the same label is never overwritten silently: :func:`existing_result` raises a
one-line error naming what differs, unless the caller asked to overwrite. A file exists only once
its run finished: a killed run leaves none and is done again (reusing cached features).
"""
from __future__ import annotations

import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

SCHEMA = "bench.run/2"


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


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ, with both values (short)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if old != new:
        def short(v: Any) -> str:
            text = json.dumps(v, default=str)
            return text if len(text) <= 60 else text[:57] + "..."
        return [f"{prefix.rstrip('.')}: {short(old)} -> {short(new)}"]
    return []


def existing_result(path: Path, run_key: str, key_parts: dict, *, overwrite: bool = False) -> dict | None:
    """The finished result at ``path`` if it has ``run_key``; None if there is none (or ``overwrite``).

    A result of another key raises :class:`~bench.errors.ResultConflictError` naming the first
    differences between its configuration and this one.

    Example:
        >>> existing_result(Path("/nonexistent/seed0.json"), "k", {}) is None
        True
    """
    from bench.errors import ResultConflictError

    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultConflictError(f"cannot read the existing result {path} ({exc}); delete it or use --overwrite") from exc
    if old.get("run_key") == run_key:
        return old
    if overwrite:
        return None
    diffs = _differences(old.get("key_parts", {}), key_parts) or ["(a result of an older harness version)"]
    shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
    raise ResultConflictError(f"{path} holds a result of another configuration ({shown}); use --name to keep "
                              f"both, or --overwrite to replace it")


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


class PeakMemory:
    """Peak memory of one run, not of the process: resets the counters on entry, reads them on exit.

    On Linux, writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's resident high-water
    mark (``VmHWM``) to the current RSS, so a second run in one command does not report the first
    one's peak. Where that reset is missing or ignored, or the mark does not follow new pages (probed
    once per process), the process peak (``ru_maxrss``) is all there is, and ``method`` says so.
    Either is resident memory: pages the allocator reuses from an earlier run do not raise it.
    The CUDA peak is reset with ``torch.cuda.reset_peak_memory_stats``.

    Example:
        >>> with PeakMemory("cpu") as peak:
        ...     _ = bytearray(10**6)
        >>> peak.rss_bytes > 0 and peak.method in ("VmHWM since run start", "process ru_maxrss")
        True
    """

    def __init__(self, device: str) -> None:
        self.device, self.rss_bytes, self.gpu_bytes, self.method = device, 0, 0, "process ru_maxrss"

    def __enter__(self) -> "PeakMemory":
        if _hwm_is_live() and _reset_hwm() and _reset_took_effect():
            self.method = "VmHWM since run start"
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def read(self) -> "PeakMemory":
        """Update ``rss_bytes`` / ``gpu_bytes`` to the peaks so far."""
        hwm = _vm_hwm() if self.method.startswith("VmHWM") else None
        self.rss_bytes = hwm if hwm is not None else peak_rss_bytes()
        if self.device.startswith("cuda"):
            import torch

            self.gpu_bytes = int(torch.cuda.max_memory_allocated())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.read()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _vm_hwm() -> int | None:
    return _status_kib("VmHWM")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@functools.cache
def _hwm_is_live() -> bool:
    """Whether this kernel's high-water mark can be reset and then follows new pages; probed once.

    Touches 64 MiB of fresh anonymous pages (not the allocator's, which may hand back pages that are
    already resident) between two resets, and wants the mark to rise by them and to fall back after.
    Costs 50-60 ms once per process (measured). Two CI failures taught this: a mark that looked reset
    there did not report a later 400 MiB allocation.
    """
    return _probe_hwm()


def _probe_hwm(nbytes: int = 64 * 2**20) -> bool:
    import mmap

    if not (_reset_hwm() and _reset_took_effect()):
        return False
    before = _status_kib("VmRSS")
    try:
        with mmap.mmap(-1, nbytes) as m:
            for at in range(0, nbytes, mmap.PAGESIZE):
                m[at] = 1
            risen = _vm_hwm()
    except (OSError, ValueError):
        return False
    if before is None or risen is None or risen - before < nbytes * 7 // 8:
        return False
    return _reset_hwm() and _reset_took_effect()


def _reset_took_effect() -> bool:
    """Whether the high-water mark now sits at the current RSS, so later reads are this run's peak.

    A kernel or sandbox may accept the write to ``clear_refs`` and ignore it; trusting the write
    alone would then report an earlier run's peak as this one's.
    """
    hwm, rss = _vm_hwm(), _status_kib("VmRSS")
    if hwm is None or rss is None:
        return False
    return hwm - rss <= max(32 * 2**20, rss // 20)


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
