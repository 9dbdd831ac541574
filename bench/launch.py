"""Fan units of work out as submitit job arrays: ``--launcher local`` (this machine) or ``slurm``.

A **unit** is one independent piece of a command: a ``bench run`` run (backbone, dataset, split
seed), or one seed of ``bench synth``. Each unit names the result files it writes (relative to
``--out``), so the results tree is the same whichever launcher ran it. Before anything is submitted
the units are filtered: a unit whose results exist with the same run key, or that an earlier batch
is still running, is not submitted again; so re-running a command submits only what is missing.

Under ``<out>/_jobs/``::

    batches/<batch>.json                 the manifest of one submission (units, job ids), atomic
    <launcher>/                          submitit's folder: pickled calls, stdout/stderr logs per job
    <launcher>/records/<batch>/<unit>.json   what each unit reported: running, done (run keys), failed

``bench status`` reads these (:mod:`bench.status`). The local launcher keeps at most
``array_parallelism`` units running at once and waits for them; the slurm launcher submits one job
array and returns.

Example:
    >>> load_options({"partition": "gpu", "gpus": 1}, None).partition
    'gpu'
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from bench.errors import BenchError

LAUNCHERS = ("inprocess", "local", "slurm")
_TIME_DEFAULT = {"local": 7 * 24 * 60, "slurm": 240}  # minutes; submitit's own defaults (2 and 5) kill real runs


@dataclass
class LaunchOptions:
    """Where and how units run; the keys of a ``--launcher-config`` file are these field names.

    Example:
        >>> LaunchOptions(launcher="slurm", gpus=1).time_minutes()
        240
    """

    launcher: str = "inprocess"
    partition: str | None = None
    gpus: int | None = None  # GPUs per job
    time: int | None = None  # minutes per job
    mem: float | None = None  # GB per job
    array_parallelism: int | None = None  # units running at once
    cpus: int | None = None  # CPUs per job (slurm cpus_per_task)
    setup: list[str] = field(default_factory=list)  # shell lines run before each job (module load ...)

    def time_minutes(self) -> int:
        return int(self.time) if self.time is not None else _TIME_DEFAULT.get(self.launcher, 240)


def _read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise BenchError(f"--launcher-config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise BenchError(f"--launcher-config {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({err})") from err
    if not isinstance(data, dict):
        raise BenchError(f"--launcher-config {path}: expected a table of options, got {type(data).__name__}")
    return data


def load_options(cli: dict[str, Any], config_file: str | Path | None) -> LaunchOptions:
    """Options from a config file (JSON, or TOML by its ``.toml`` suffix), then the CLI's non-None values.

    Example:
        >>> load_options({"launcher": "local", "time": 30}, None).time_minutes()
        30
    """
    names = {f.name for f in fields(LaunchOptions)}
    merged: dict[str, Any] = {}
    where = "the command line"
    if config_file:
        where = f"--launcher-config {config_file}"
        data = _read_config_file(Path(config_file))
        unknown = sorted(set(data) - names)
        if unknown:
            raise BenchError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
        merged.update(data)
    merged.update({k: v for k, v in cli.items() if v is not None and k in names})
    opts = LaunchOptions(**merged)
    if opts.launcher not in LAUNCHERS:
        raise BenchError(f"{where}: launcher {opts.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    for name in ("gpus", "time", "array_parallelism", "cpus"):
        value = getattr(opts, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "gpus" else 1)):
            raise BenchError(f"{where}: {name} must be a {'non-negative' if name == 'gpus' else 'positive'} integer, got {value!r}")
    if opts.mem is not None and (isinstance(opts.mem, bool) or not isinstance(opts.mem, (int, float)) or not opts.mem > 0):
        raise BenchError(f"{where}: mem must be a positive number of GB, got {opts.mem!r}")
    if not isinstance(opts.setup, list) or not all(isinstance(s, str) for s in opts.setup):
        raise BenchError(f"{where}: setup must be a list of shell lines, got {opts.setup!r}")
    return opts


@dataclass
class Unit:
    """One independent piece of work: ``fn(*args)`` writes ``outputs`` and returns ``{output: run_key}``.

    ``fn`` must be a module-level function (it is sent to the job by reference). ``is_current``
    (optional, run at submission) says whether existing outputs have the key this unit would
    produce; without it, existing outputs count as done and the job checks the key itself.
    """

    name: str
    fn: Callable[..., dict]
    args: tuple
    outputs: list[str]
    is_current: Callable[[], bool] | None = None


def _slug(name: str) -> str:
    return name.replace("/", "__").replace(" ", "_")


def jobs_root(out: Path) -> Path:
    return Path(out) / "_jobs"


def execute_unit(fn: Callable[..., dict], args: tuple, record: str, threads: int | None) -> dict:
    """The body of every job: record running, call the unit, record done (with its run keys) or failed."""
    from bench.results import write_json_atomic

    path = Path(record)
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID", "")
    job_id = f"{job_id}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job_id else (
        os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID", ""))
    base = {"job_id": job_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    write_json_atomic(path, {**base, "state": "running"})
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        keys = fn(*args)
    except BaseException as exc:  # recorded for `bench status`, then raised so the job fails too
        message = " ".join(str(exc).split()) or type(exc).__name__
        write_json_atomic(path, {**base, "state": "failed", "error": f"{type(exc).__name__}: {message}"[:500],
                                 "finished": time.time()})
        raise
    write_json_atomic(path, {**base, "state": "done", "run_keys": keys, "finished": time.time()})
    return keys


def import_submitit() -> Any:
    """The submitit module, or a one-line error saying how to install it."""
    try:
        import submitit
    except ImportError as err:
        raise BenchError("the local and slurm launchers run on submitit, which is not installed: "
                         "pip install -e '.[cluster]'") from err
    return submitit


def local_width(opts: LaunchOptions, default: int) -> tuple[LaunchOptions, int | None]:
    """The local launcher's units at once (``default`` unless set) and torch threads per unit.

    The cores are shared out between the units running together; on other launchers the scheduler
    gives each job its CPUs, so the thread count is left alone (None).

    Example:
        >>> opts, threads = local_width(LaunchOptions("local"), default=2)
        >>> opts.array_parallelism, threads == max(1, (os.cpu_count() or 1) // 2)
        (2, True)
    """
    if opts.launcher != "local":
        return opts, None
    opts = replace(opts, array_parallelism=opts.array_parallelism or default)
    return opts, max(1, (os.cpu_count() or 1) // opts.array_parallelism)


def make_executor(opts: LaunchOptions, folder: Path, units: int):
    """A submitit executor for ``opts.launcher`` (local or slurm) with the job parameters set.

    Example:
        >>> # make_executor(LaunchOptions("slurm", partition="gpu", gpus=1), Path("reports/_jobs/slurm"), 10)
    """
    submitit = import_submitit()
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=opts.launcher)
    except RuntimeError as err:  # SlurmExecutor: no srun on this machine
        raise BenchError(f"--launcher {opts.launcher}: {err}") from err
    params: dict[str, Any] = {"name": "bench", "timeout_min": opts.time_minutes()}
    if opts.gpus is not None:
        params["gpus_per_node"] = opts.gpus
    if opts.mem is not None:
        params["mem_gb"] = float(opts.mem)
    if opts.cpus is not None:
        params["cpus_per_task"] = opts.cpus
    if opts.launcher == "slurm":
        if opts.partition:
            params["slurm_partition"] = opts.partition
        params["slurm_array_parallelism"] = opts.array_parallelism or units
        if opts.setup:
            params["slurm_setup"] = list(opts.setup)
    elif opts.setup:
        params["local_setup"] = list(opts.setup)
    executor.update_parameters(**params)
    return executor


def _batch_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.urandom(2).hex()}"


def select_pending(units: list[Unit], out: Path, overwrite: bool = False) -> tuple[list[Unit], dict[str, str]]:
    """The units to submit, and why each other one is not (``{name: "done" | "running in batch X"}``).

    A unit is skipped when all its outputs exist and are current (same run key: a conflicting
    result raises, as ``bench run`` does, unless ``overwrite``), or when an earlier batch is still
    running it.
    """
    from bench.status import running_units

    running = running_units(out)
    pending, skipped = [], {}
    for unit in units:
        if unit.name in running:
            skipped[unit.name] = f"running in batch {running[unit.name]}"
            continue
        if unit.outputs and all((Path(out) / o).exists() for o in unit.outputs) and not overwrite:
            if unit.is_current is None or unit.is_current():
                skipped[unit.name] = "done"
                continue
        pending.append(unit)
    return pending, skipped


def submit(units: list[Unit], out: Path, opts: LaunchOptions, *, command: str = "", threads: int | None = None,
           overwrite: bool = False, on_event: Callable[[str], None] | None = None) -> dict:
    """Pre-filter, submit the rest as one job array, write the batch manifest; the local launcher waits.

    Returns the manifest (``units``: name, job id, outputs; ``skipped``: name -> reason). With the
    local launcher, which waits for its jobs, at most ``array_parallelism`` units run at once.

    Example:
        >>> # submit(units, Path("reports"), LaunchOptions("local", array_parallelism=2))["units"][0]["job_id"]
    """
    from bench.results import write_json_atomic

    say = on_event or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out).resolve()
    folder = jobs_root(out) / opts.launcher
    executor = make_executor(opts, folder, len(units))  # first: no SLURM here fails before any planning
    pending, skipped = select_pending(units, out, overwrite)
    batch = _batch_id()
    records = folder / "records" / batch
    manifest = {"batch": batch, "launcher": opts.launcher, "created": time.time(), "host": socket.gethostname(),
                "command": command, "folder": str(folder), "options": {f.name: getattr(opts, f.name) for f in fields(opts)},
                "units": [], "skipped": skipped}
    manifest_path = jobs_root(out) / "batches" / f"{batch}.json"
    say(f"{len(units)} units: {len(pending)} to submit, {len(units) - len(pending)} skipped "
        f"({sum(v == 'done' for v in skipped.values())} done, {sum(v != 'done' for v in skipped.values())} running)")
    if not pending:
        return manifest
    if opts.launcher == "slurm" and not opts.array_parallelism:
        executor.update_parameters(slurm_array_parallelism=len(pending))
    entries = [{"unit": u.name, "outputs": u.outputs, "record": str(records / f"{_slug(u.name)}.json"), "job_id": None}
               for u in pending]

    def send(indices: list[int]) -> list:
        jobs = executor.map_array(execute_unit, [pending[i].fn for i in indices], [pending[i].args for i in indices],
                                  [entries[i]["record"] for i in indices], [threads] * len(indices))
        for i, job in zip(indices, jobs):
            entries[i]["job_id"] = str(job.job_id)
        manifest["units"] = [e for e in entries if e["job_id"] is not None]
        write_json_atomic(manifest_path, manifest)
        return jobs

    if opts.launcher == "slurm":
        send(list(range(len(pending))))
        say(f"batch {batch}: job array {entries[0]['job_id'].split('_')[0]} with {len(pending)} tasks; "
            f"logs in {folder}; follow with: bench status --out {out}")
        return manifest
    _wait(send, entries, opts.array_parallelism or len(pending), say)
    return manifest


def _wait(send: Callable[[list[int]], list], entries: list[dict], width: int, say: Callable[[str], None]) -> None:
    """Keep ``width`` units in flight, report each as it ends; fail at the end if any failed."""
    total = len(entries)
    running: dict[int, Any] = {}
    next_unit, finished, failed = 0, 0, []
    try:
        while finished < total:
            if len(running) < width and next_unit < total:
                todo = list(range(next_unit, min(total, next_unit + width - len(running))))
                running.update(zip(todo, send(todo)))
                next_unit += len(todo)
            for i, job in list(running.items()):
                if not job.done():
                    continue
                del running[i]
                finished += 1
                record = _read_json(Path(entries[i]["record"]))
                if record.get("state") != "done":
                    failed.append(entries[i]["unit"])
                    why = record.get("error", "the job ended without a record: killed?")
                    say(f"[{finished}/{total}] {entries[i]['unit']}: FAILED ({why}); log: {job.paths.stderr}")
                else:
                    say(f"[{finished}/{total}] {entries[i]['unit']}: done (job {entries[i]['job_id']})")
            time.sleep(0.2)
    except BaseException:  # Ctrl-C: local jobs would outlive this process; stop them (a re-run resumes)
        for job in running.values():
            job.cancel(check=False)
        raise
    if failed:
        raise BenchError(f"{len(failed)} of {total} units failed ({', '.join(failed[:3])}"
                         f"{' ...' if len(failed) > 3 else ''}); `bench status` shows them, and re-running the "
                         f"command submits only what is missing")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----- the units of `bench run` -----------------------------------------------------------------

def run_unit(spec: Any) -> dict:
    """One ``bench run`` unit in a job: run (or reuse) it; ``{result path relative to out: run key}``."""
    from bench.runner import run

    result = run(spec)
    return {_run_output(spec): result["run_key"]}


def _run_output(spec: Any) -> str:
    from bench.cards import get_card
    from bench.results import run_path

    seed = spec.seed if spec.split == "resplit" else "released"
    return run_path(Path("."), get_card(spec.dataset).name, spec.label, seed).as_posix()


def _run_is_current(spec: Any) -> bool:
    """Whether the result at the spec's path has its run key (plans on the CPU: no GPU needed to submit)."""
    from bench.results import existing_result
    from bench.runner import plan

    p = plan(replace(spec, device="cpu", progress=False))
    return existing_result(p.out_path, p.run_key, p.key_parts, overwrite=spec.overwrite) is not None


def run_units(specs: list[Any], out: Path) -> list[Unit]:
    """``bench run``'s runs as units (jobs write under ``out``, made absolute for other machines).

    Example:
        >>> from bench.runner import RunSpec
        >>> run_units([RunSpec("pixels", "demo", seed=3)], Path("/r"))[0].name
        'runs/demo/pixels/seed3.json'
    """
    out = Path(out).resolve()
    units = []
    for spec in specs:
        spec = replace(spec, out=out, progress=False)
        name = _run_output(spec)
        units.append(Unit(name=name, fn=run_unit, args=(spec,), outputs=[name],
                          is_current=lambda s=spec: _run_is_current(s)))
    return units


# ----- command line -----------------------------------------------------------------------------

def add_arguments(parser: Any) -> None:
    """The launcher options, shared by ``bench run`` and ``bench synth``."""
    group = parser.add_argument_group("scale-out (submitit job arrays; `bench status` follows them)")
    group.add_argument("--launcher", choices=LAUNCHERS, default=None,
                       help="inprocess (default): here; local: submitit jobs on this machine; slurm: a job array")
    group.add_argument("--launcher-config", metavar="FILE",
                       help="JSON or TOML with launcher, partition, gpus, time, mem, array_parallelism, cpus, setup; "
                            "command-line options override it")
    group.add_argument("--partition", help="slurm partition")
    group.add_argument("--gpus", type=int, default=None, help="GPUs per job")
    group.add_argument("--time", type=int, default=None, metavar="MINUTES",
                       help="time limit per job (default 240 on slurm, a week locally)")
    group.add_argument("--mem", type=float, default=None, metavar="GB", help="memory per job")
    group.add_argument("--array-parallelism", type=int, default=None, metavar="N",
                       help="units running at once (local default: one per core within RAM)")


def options_from_args(args: Any) -> LaunchOptions:
    """The launch options of a parsed command line (``--launcher-config`` first, then the options)."""
    cli = {"launcher": args.launcher, "partition": args.partition, "gpus": args.gpus, "time": args.time,
           "mem": args.mem, "array_parallelism": args.array_parallelism}
    return load_options(cli, args.launcher_config)
