"""End-to-end runs on the demo: result contents, skip/resume after a kill, atomic writes, reports."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import report
from bench.results import write_json_atomic
from bench.runner import RunSpec, run


def _quick(out: Path, seed: int = 0, **kw) -> RunSpec:
    return RunSpec(backbone="pixels", dataset="demo", seed=seed, out=out, progress=False,
                   max_train=3, max_test=3, **kw)


def test_run_writes_a_complete_result_and_skips_when_done(tmp_path):
    result = run(_quick(tmp_path))
    path = tmp_path / "runs" / "demo" / "pixels" / "seed0.json"
    assert path.exists()
    saved = json.loads(path.read_text())
    for variant in ("official", "standard"):
        assert 0.0 <= saved["miou"][variant] <= 1.0
        assert len(saved["per_class_iou"][variant]) == len(saved["per_class_iou"]["class_ids"])
    prov = saved["provenance"]
    assert prov["peak_rss_bytes"] > 0 and prov["wall_time_s"]["total"] > 0 and prov["versions"]["torch"]
    assert len(saved["files"]["train"]) == 3 and len(saved["files"]["test"]) == 3
    assert not set(saved["files"]["train"]) & set(saved["files"]["test"])
    assert saved["config"]["members"] == 10 and len(set(saved["config"]["member_seeds"])) == 10
    mtime = path.stat().st_mtime_ns
    again = run(_quick(tmp_path))
    assert again["miou"] == result["miou"] and path.stat().st_mtime_ns == mtime


def test_seeds_change_the_split_and_reproduce_exactly(tmp_path):
    a = run(_quick(tmp_path / "a", seed=1))
    b = run(_quick(tmp_path / "b", seed=1))
    c = run(_quick(tmp_path / "c", seed=2))
    assert a["files"] == b["files"] and a["miou"] == b["miou"] and a["per_class_iou"] == b["per_class_iou"]
    assert a["files"] != c["files"]


def _cached_images(root: Path) -> int:
    """Finished feature-store entries; the run renames temporary folders meanwhile, so retry on a race."""
    try:
        return len(list(root.rglob("done")))
    except FileNotFoundError:
        return 0


def test_killed_run_leaves_no_result_and_resumes_to_the_same_numbers(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, BENCH_HOME=str(home))
    cmd = [sys.executable, "-m", "bench.cli", "run", "--backbone", "pixels", "--dataset", "demo",
           "--seeds", "0", "--no-progress", "--device", "cpu"]
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not _cached_images(home / "features"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = tmp_path / "killed" / "runs" / "demo" / "pixels" / "seed0.json"
    assert not result.exists(), "the run finished before it could be killed; the test proves nothing"
    assert not list((tmp_path / "killed").rglob(".seed0.json*")), "a temporary result file was left"
    done = subprocess.run(cmd + ["--out", str(tmp_path / "killed")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    fresh_env = dict(os.environ, BENCH_HOME=str(tmp_path / "fresh"))
    fresh = subprocess.run(cmd + ["--out", str(tmp_path / "fresh_out")], env=fresh_env, capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    a = json.loads(result.read_text())
    b = json.loads((tmp_path / "fresh_out" / "runs" / "demo" / "pixels" / "seed0.json").read_text())
    assert a["miou"] == b["miou"] and a["per_class_iou"] == b["per_class_iou"]


def test_atomic_json_leaves_nothing_on_failure(tmp_path):
    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    target = tmp_path / "r.json"
    with pytest.raises(RuntimeError):
        write_json_atomic(target, {"x": Boom()})
    assert list(tmp_path.iterdir()) == []


def test_report_formats(tmp_path):
    for seed in (0, 1):
        run(_quick(tmp_path, seed=seed))
    md = report.render(tmp_path, "md")
    assert md.splitlines()[0].startswith("| method |") and "| pixels |" in md and "±" in md
    df = report.collect(tmp_path)
    row = df.iloc[0]
    assert row["n"] == 2 and row["backbone"] == "pixels" and row["dataset"] == "demo"
    csv = report.render(tmp_path, "csv")
    assert csv.splitlines()[0] == "backbone,dataset,split,config_key,n,mean,std,paper_mean,paper_std,delta"
    latex = report.render(tmp_path, "latex")
    assert "\\begin{tabular}" in latex and "pixels" in latex
    standard = report.collect(tmp_path, "standard")
    assert standard.iloc[0]["n"] == 2
