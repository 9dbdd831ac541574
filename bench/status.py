"""``bench status``: done / running / failed / missing units of every batch submitted under ``--out``.

A unit is

- **done** when its result files are there with the run keys its job reported (or, for a job that
  left no record, when its results are there at all: made by another command);
- **failed** when its job recorded an error, or ended (killed, cancelled, timed out, out of memory)
  without a result: the scheduler's state is shown;
- **running** while its job is queued or running;
- **missing** when its job finished but the result is gone or was replaced since.

Example:
    >>> render(Path("/nonexistent"))
    'no batches under /nonexistent/_jobs/batches'
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

STATES = ("done", "running", "failed", "missing", "unknown")
_SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


def _read(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def batches(out: Path) -> list[dict]:
    """The batch manifests under ``out/_jobs/batches``, oldest first."""
    folder = Path(out) / "_jobs" / "batches"
    found = [_read(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return sorted((b for b in found if b.get("batch")), key=lambda b: (b.get("created", 0), b["batch"]))


def _local_alive(job_id: str, host: str) -> bool | None:
    """Is the local job's controller process alive? None when it ran on another host."""
    if host != socket.gethostname():
        return None
    try:
        stat = Path(f"/proc/{int(job_id)}/stat").read_text()
        cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
    return not zombie and b"submitit" in cmdline  # a recycled pid runs something else


def _slurm_states(folder: str, job_ids: list[str]) -> dict[str, str]:
    """Scheduler states (``sacct`` through submitit's watcher), ``UNKNOWN`` where it cannot tell."""
    if not job_ids:
        return {}
    from bench.launch import import_submitit

    submitit = import_submitit()
    jobs = [submitit.SlurmJob(folder=folder, job_id=j) for j in job_ids]  # registers all: one sacct call
    return {j.job_id: (j.watcher.get_state(j.job_id, mode="force") or "UNKNOWN").split()[0] for j in jobs}


def _result_key(path: Path) -> str | None:
    return _read(path).get("run_key") if path.exists() else None


def unit_states(out: Path, batch: dict) -> list[dict]:
    """Each unit of ``batch`` with its ``state`` and a ``detail`` (error, scheduler state, job id)."""
    out = Path(out)
    launcher = batch.get("launcher")
    pending = []
    rows = []
    for entry in batch.get("units", []):
        record = _read(Path(entry["record"]))
        keys = {o: _result_key(out / o) for o in entry.get("outputs", [])}
        row = {"unit": entry["unit"], "job_id": entry.get("job_id"), "state": None, "detail": ""}
        rows.append(row)
        if record.get("state") == "done":
            want = record.get("run_keys") or {}
            if all(keys[o] is not None and keys[o] == want.get(o) for o in keys):
                row["state"] = "done"
            else:
                row["state"], row["detail"] = "missing", "the job finished but its result is gone or was replaced"
        elif keys and all(k is not None for k in keys.values()) and record.get("state") == "failed":
            row["state"], row["detail"] = "done", "failed here, done since by another batch or command"
        elif record.get("state") == "failed":
            row["state"], row["detail"] = "failed", record.get("error", "")
        else:
            pending.append((row, keys))
    if launcher == "slurm":
        states = _slurm_states(batch["folder"], [r["job_id"] for r, _ in pending])
    for row, keys in pending:
        if launcher == "slurm":
            alive: bool | None = states.get(row["job_id"], "UNKNOWN") in _SLURM_ACTIVE
            scheduler = states.get(row["job_id"], "UNKNOWN")
            if scheduler == "UNKNOWN":
                alive = None
        else:
            alive, scheduler = _local_alive(str(row["job_id"]), batch.get("host", "")), ""
        if alive:
            row["state"], row["detail"] = "running", scheduler
        elif keys and all(k is not None for k in keys.values()):
            row["state"], row["detail"] = "done", "result present (made outside this batch)"
        elif alive is None:
            row["state"], row["detail"] = "unknown", scheduler or f"ran on {batch.get('host')}"
        else:
            row["state"] = "failed"
            row["detail"] = f"the job ended without a result ({scheduler or 'killed or cancelled'})"
    return rows


def running_units(out: Path) -> dict[str, str]:
    """``{unit name: batch}`` of units some batch is still running (not to be submitted again)."""
    running: dict[str, str] = {}
    for batch in batches(out):
        for row in unit_states(out, batch):
            if row["state"] == "running":
                running[row["unit"]] = batch["batch"]
    return running


def render(out: Path) -> str:
    """The status text: one summary line per batch, then one line per unit that is not done.

    Example:
        >>> render(Path("/nonexistent")).startswith("no batches")
        True
    """
    found = batches(out)
    if not found:
        return f"no batches under {Path(out) / '_jobs' / 'batches'}"
    lines = []
    for batch in found:
        rows = unit_states(out, batch)
        counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(batch.get("created", 0)))
        summary = ", ".join(f"{counts[s]} {s}" for s in STATES if s != "unknown" or counts[s])
        skipped = len(batch.get("skipped", {}))
        lines.append(f"batch {batch['batch']} ({batch.get('launcher')}, {len(rows)} submitted"
                     f"{f', {skipped} skipped' if skipped else ''}, {when}): {summary}")
        for row in rows:
            if row["state"] != "done":
                detail = f": {row['detail']}" if row["detail"] else ""
                lines.append(f"  {row['state']:8} {row['unit']}  job {row['job_id']}{detail}")
    return "\n".join(lines)


def cmd_status(args: Any) -> int:
    """``bench status [--out DIR]``."""
    print(render(Path(args.out)))
    return 0
