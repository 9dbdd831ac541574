"""Scale-out (issue 12): units as submitit job arrays, `bench status`, re-runs submit only what is missing.

The local path runs real jobs (submitit's local executor: one process per unit); the slurm path runs
submitit's real SLURM executor against stand-in `sbatch`/`srun`/`sacct` scripts on PATH, so the
sbatch file, the array ids and the scheduler states are the ones submitit produces and parses.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from bench import status
from bench.cli import main
from bench.errors import BenchError
from bench.launch import LaunchOptions, load_options, run_units, select_pending, submit
from bench.runner import RunSpec

pytest.importorskip("submitit")


def _matrix(out: Path) -> list[RunSpec]:
    # 2 labels x 2 split seeds; one image each way and 2 members keep a unit to about a second of work
    return [RunSpec("pixels", "demo", seed=s, name=name, max_train=1, max_test=1, members=2, out=out)
            for name in ("pix-a", "pix-b") for s in (0, 1)]


def _manifests(out: Path) -> list[dict]:
    return status.batches(out)


def test_a_2x2_matrix_through_the_local_executor_kill_one_and_rerun_only_it(tmp_path, capsys):
    out = tmp_path / "reports"
    units = run_units(_matrix(out), out)
    victim = "runs/demo/pix-b/seed1.json"  # in the second wave of an array of width 2
    events: list[str] = []
    errors: list[BaseException] = []

    def first() -> None:
        try:
            submit(units, out, LaunchOptions("local", array_parallelism=2), threads=1, on_event=events.append)
        except BaseException as exc:  # noqa: BLE001 - the thread hands its error to the test
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.time() + 120
    pid = None
    while pid is None and time.time() < deadline:  # wait for the victim's job, then kill it mid-run
        for batch in _manifests(out):
            pid = next((int(u["job_id"]) for u in batch["units"] if u["unit"] == victim), None)
        time.sleep(0.05)
    assert pid is not None
    os.kill(pid, signal.SIGINT)  # submitit's cancel: the controller stops the job's process
    thread.join(timeout=180)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], BenchError) and "1 of 4 units failed" in str(errors[0])
    assert not (out / victim).exists()
    done = sorted(p.relative_to(out).as_posix() for p in (out / "runs").rglob("seed*.json"))
    assert done == ["runs/demo/pix-a/seed0.json", "runs/demo/pix-a/seed1.json", "runs/demo/pix-b/seed0.json"]
    assert sum("done (job" in e for e in events) == 3 and any("FAILED" in e and victim in e for e in events)

    assert main(["status", "--out", str(out)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert "(local, 4 submitted" in text[0] and "3 done, 0 running, 1 failed, 0 missing" in text[0]
    assert text[1].split()[:2] == ["failed", victim]

    # the re-run submits the killed unit only (the three results are current: same run key)
    before = {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in (out / "runs").rglob("seed*.json")}
    manifest = submit(run_units(_matrix(out), out), out, LaunchOptions("local", array_parallelism=2), threads=1,
                      on_event=events.append)
    assert [u["unit"] for u in manifest["units"]] == [victim]
    assert set(manifest["skipped"]) == set(before) and set(manifest["skipped"].values()) == {"done"}
    assert all((out / p).stat().st_mtime_ns == t for p, t in before.items())  # the finished results were not redone
    result = json.loads((out / victim).read_text())
    assert result["seed"] == 1 and result["backbone"] == "pix-b"

    # a result deleted after its batch finished shows as missing; the killed unit's batch now counts it done
    (out / "runs/demo/pix-a/seed0.json").unlink()
    lines = status.render(out).splitlines()
    assert "3 done, 0 running, 0 failed, 1 missing" in lines[0]
    assert lines[1].split()[:2] == ["missing", "runs/demo/pix-a/seed0.json"]
    assert "1 submitted, 3 skipped" in lines[2] and "1 done, 0 running, 0 failed, 0 missing" in lines[2]

    # the pre-filter of a third call: nothing but the deleted unit
    pending, skipped = select_pending(run_units(_matrix(out), out), out)
    assert [u.name for u in pending] == ["runs/demo/pix-a/seed0.json"] and len(skipped) == 3


def _fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """`sbatch` (records the file, answers like SLURM with increasing ids), `srun`, `sacct` (a states file)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "sbatch": f"""#!/bin/sh
n=$(ls {tmp_path}/sbatch_*.sh 2>/dev/null | wc -l)
cp "$1" {tmp_path}/sbatch_$n.sh
echo "Submitted batch job $((4242 + n))"
""",
        "srun": "#!/bin/sh\nexit 0\n",
        "sacct": f"#!/bin/sh\necho 'JobID|State|NodeList'\ncat {tmp_path}/sacct.txt 2>/dev/null\n",
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_slurm_job_array_options_status_and_resubmission(tmp_path, monkeypatch, capsys):
    _fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "reports"
    config = tmp_path / "cluster.toml"
    config.write_text('launcher = "slurm"\npartition = "cpu"\ngpus = 1\nmem = 16\ntime = 30\n'
                      'setup = ["module load cuda"]\n')
    args = ["run", "--backbone", "pixels", "--dataset", "demo", "--seeds", "0,1", "--name", "px", "--out", str(out),
            "--launcher-config", str(config), "--partition", "gpu", "--time", "240", "--mem", "32",
            "--array-parallelism", "3"]
    assert main(args) == 0
    script = (tmp_path / "sbatch_0.sh").read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=240", "#SBATCH --mem=32GB", "#SBATCH --job-name=bench", "module load cuda"):
        assert line in script, line
    assert str(out.resolve() / "_jobs" / "slurm") in script  # the logs go under <out>/_jobs/slurm
    [batch] = _manifests(out)
    assert [u["job_id"] for u in batch["units"]] == ["4242_0", "4242_1"]
    assert [u["unit"] for u in batch["units"]] == ["runs/demo/px/seed0.json", "runs/demo/px/seed1.json"]
    for job in ("4242_0", "4242_1"):
        assert (out / "_jobs" / "slurm" / f"{job}_submitted.pkl").exists()
    assert "bench status" in capsys.readouterr().err

    (tmp_path / "sacct.txt").write_text("4242_0|RUNNING|node1\n4242_1|TIMEOUT|node2\n")
    assert main(["status", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 done, 1 running, 1 failed, 0 missing" in text
    assert "running  runs/demo/px/seed0.json  job 4242_0: RUNNING" in text
    assert "failed   runs/demo/px/seed1.json  job 4242_1: the job ended without a result (TIMEOUT)" in text

    # re-running: the running unit is not submitted twice, the timed-out one is
    assert main(args) == 0
    script = (tmp_path / "sbatch_1.sh").read_text()
    assert "#SBATCH --array" not in script  # a single unit is a plain job
    batches = _manifests(out)
    assert len(batches) == 2 and [u["unit"] for u in batches[1]["units"]] == ["runs/demo/px/seed1.json"]
    assert batches[1]["units"][0]["job_id"] == "4243"
    assert batches[1]["skipped"] == {"runs/demo/px/seed0.json": f"running in batch {batches[0]['batch']}"}


def test_launcher_options_file_and_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"launcher": "slurm", "partition": "a", "array_parallelism": 4}))
    opts = load_options({"partition": "b", "gpus": None}, path)
    assert (opts.launcher, opts.partition, opts.array_parallelism, opts.gpus) == ("slurm", "b", 4, None)
    path.write_text(json.dumps({"partitoin": "a"}))
    with pytest.raises(BenchError, match="unknown key 'partitoin'"):
        load_options({}, path)
    path.write_text(json.dumps({"time": -3}))
    with pytest.raises(BenchError, match="time must be a positive integer"):
        load_options({}, path)
    with pytest.raises(BenchError, match="no such file"):
        load_options({}, tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("launcher = ")
    with pytest.raises(BenchError, match="not valid TOML"):
        load_options({}, tmp_path / "bad.toml")


def test_slurm_without_a_cluster_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun anywhere
    code = main(["run", "--backbone", "pixels", "--dataset", "demo", "--seeds", "0", "--out", str(tmp_path / "r"),
                 "--launcher", "slurm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "srun" in err[0]


def test_bench_synth_fans_out_one_job_per_seed_and_skips_seeds_with_results(tmp_path, monkeypatch, capsys):
    _fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "reports"
    args = ["synth", "datasetddpm", "--dataset", "demo", "--backbone", "ddpm.demo", "--num", "100", "--sizes", "50,100",
            "--seeds", "0,1,2", "--deeplab-arch", "small", "--nproc", "2", "--out", str(out),
            "--launcher", "slurm", "--array-parallelism", "2", "--gpus", "2"]
    assert main(args) == 0
    assert "#SBATCH --array=0-2%2" in (tmp_path / "sbatch_0.sh").read_text()
    [batch] = _manifests(out)
    assert [u["unit"] for u in batch["units"]] == [f"synth/demo/datasetddpm/seed{s}" for s in (0, 1, 2)]
    assert batch["units"][1]["outputs"] == ["runs/demo/datasetddpm@50/seed1.json", "runs/demo/datasetddpm@100/seed1.json"]

    for output in batch["units"][0]["outputs"]:  # seed 0 finished; seed 1 still runs; seed 2 was cancelled
        (out / output).parent.mkdir(parents=True, exist_ok=True)
        (out / output).write_text(json.dumps({"run_key": "k"}))
    (tmp_path / "sacct.txt").write_text("4242_0|COMPLETED|n1\n4242_1|RUNNING|n1\n4242_2|CANCELLED by 0|n2\n")
    lines = status.render(out).splitlines()
    assert "1 done, 1 running, 1 failed, 0 missing" in lines[0], lines
    assert main(args) == 0
    second = _manifests(out)[1]
    assert [u["unit"] for u in second["units"]] == ["synth/demo/datasetddpm/seed2"]
    assert second["skipped"]["synth/demo/datasetddpm/seed0"] == "done"
    assert second["skipped"]["synth/demo/datasetddpm/seed1"].startswith("running in batch")


def test_bench_synth_through_the_local_executor_from_a_released_set(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rel.npz", rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8),
             rng.integers(0, 9, (8, 64, 64), dtype=np.uint8), rng.random(8).astype(np.float32))
    out = tmp_path / "reports"
    args = ["synth", "datasetddpm", "--dataset", "demo", "--released", str(tmp_path / "rel.npz"), "--num", "8",
            "--shard-size", "4", "--deeplab-arch", "small", "--epochs", "1", "--deeplab-batch-size", "4",
            "--launcher", "local", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    result = json.loads((out / "runs/demo/datasetddpm/seed0.json").read_text())
    assert result["synthetic"]["num"] == 8 and result["model"]["config"]["epochs"] == 1
    assert "| datasetddpm |" in capsys.readouterr().out
    assert "1 done, 0 running, 0 failed, 0 missing" in status.render(out)
    assert main(args) == 0  # nothing left to do: no second job, no second batch
    assert "1 units: 0 to submit, 1 skipped (1 done, 0 running)" in capsys.readouterr().err
    assert len(_manifests(out)) == 1


def _sweep_argv(out: Path, *extra: str) -> list[str]:
    return ["analyze", "sweep", "--backbone", "ddpm", "--dataset", "demo", "--blocks", "6,8", "--steps", "50",
            "--seeds", "0", "--members", "2", "--max-train", "2", "--max-test", "2", "--max-steps", "20",
            "--out", str(out), "--device", "cpu", "--no-progress", *extra]


def test_sweep_cells_fan_out_as_jobs_and_a_rerun_submits_only_a_missing_cell(tmp_path, monkeypatch, capsys):
    import pandas as pd

    inproc = tmp_path / "inprocess"
    assert main(_sweep_argv(inproc)) == 0
    want = pd.read_csv(inproc / "analyses/demo/sweep/cells.csv").sort_values("block").reset_index(drop=True)

    out = tmp_path / "reports"
    argv = _sweep_argv(out, "--launcher", "local", "--array-parallelism", "2")
    assert main(argv) == 0
    [batch] = _manifests(out)
    cells = ["analyses/demo/sweep/cells/seed0/t50.b6.json", "analyses/demo/sweep/cells/seed0/t50.b8.json"]
    assert sorted(o for u in batch["units"] for o in u["outputs"]) == cells
    assert [u["unit"] for u in batch["units"]] == ["sweep/demo/seed0/t50.b6", "sweep/demo/seed0/t50.b8"]
    got = pd.read_csv(out / "analyses/demo/sweep/cells.csv").sort_values("block").reset_index(drop=True)
    # the jobs' cells are the in-process cells: same keys (what produced them), same numbers
    assert got["miou"].tolist() == want["miou"].tolist() and (out / "analyses/demo/sweep/sweep.png").exists()
    keys = {c: json.loads((out / c).read_text())["key"] for c in cells}
    assert keys == {c: json.loads((inproc / c).read_text())["key"] for c in cells}

    (out / cells[1]).unlink()
    kept = (out / cells[0]).stat().st_mtime_ns
    assert main(argv) == 0
    second = _manifests(out)[1]
    assert [u["unit"] for u in second["units"]] == ["sweep/demo/seed0/t50.b8"]
    assert second["skipped"] == {"sweep/demo/seed0/t50.b6": "done"}
    assert (out / cells[0]).stat().st_mtime_ns == kept and json.loads((out / cells[1]).read_text())["key"] == keys[cells[1]]

    # on slurm the command submits and returns; the figures wait for a re-run with nothing missing
    _fake_slurm(tmp_path, monkeypatch)
    (out / cells[0]).unlink()
    (out / "analyses/demo/sweep/cells.csv").unlink()
    assert main(_sweep_argv(out, "--launcher", "slurm")) == 0
    assert [u["unit"] for u in _manifests(out)[2]["units"]] == ["sweep/demo/seed0/t50.b6"]
    assert not (out / "analyses/demo/sweep/cells.csv").exists()
    assert "re-run this command" in capsys.readouterr().err
