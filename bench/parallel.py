"""Several runs of one command on one machine: in this process, or in parallel worker processes.

On a CPU the probe's steps are small (a batch of 64 pixels per member), so much of a step is
per-op overhead that a second torch thread does not shorten; two runs side by side, one thread
each, finish a multi-run command (the demo's 15 runs) about 1.5x sooner than one run at a time on
two threads. Every run writes its own result atomically and the feature store tolerates concurrent
writers, so parallel runs give the same files as sequential ones (numbers equal up to the float
rounding of a different thread count).

Example:
    >>> auto_jobs(runs=1, device="cpu")
    1
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

GiB = 1024**3


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


def auto_jobs(runs: int, device: str, max_memory_gb: float = 4.0) -> int:
    """Worker processes for ``runs`` runs: one per core on CPU, bounded by RAM; 1 on a GPU.

    Each worker may use up to ``max_memory_gb`` for its probe stage plus ~1.5 GB for torch and the
    model, so the count also stays within the machine's memory.

    Example:
        >>> auto_jobs(runs=15, device="cuda")
        1
    """
    if runs <= 1 or device not in ("cpu", "auto"):
        return 1
    if device == "auto":
        import torch

        if torch.cuda.is_available() or (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            return 1
    by_memory = int(_ram_bytes() // ((max_memory_gb + 1.5) * GiB))
    return max(1, min(runs, os.cpu_count() or 1, by_memory))


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_one(spec: Any) -> dict:
    from bench.runner import run

    return run(spec)


def run_all(specs: Sequence[Any], jobs: int, on_done: Callable[[int, Any, dict], None]) -> None:
    """Run every spec; ``on_done(i, spec, result)`` as each finishes (in order when ``jobs == 1``).

    With ``jobs > 1`` the runs go to that many spawned processes with ``cores // jobs`` torch threads
    each; the first failure cancels the runs not started yet and is raised once the running ones end.

    Example:
        >>> run_all([], 1, print)
    """
    if jobs <= 1 or len(specs) <= 1:
        from bench.runner import run

        for i, spec in enumerate(specs, 1):
            on_done(i, spec, run(spec))
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))
    try:
        futures = {pool.submit(_run_one, spec): (i, spec) for i, spec in enumerate(specs, 1)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: futures[f][0]):
                i, spec = futures[future]
                on_done(i, spec, future.result())  # raises the worker's error here
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    sys.stderr.flush()
