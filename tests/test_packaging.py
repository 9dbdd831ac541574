"""A built wheel, installed in a fresh venv, carries everything a user needs (issue 8 item 15).

The wheel is built from a copy of the source tree without build isolation (no download), installed
with ``--no-deps`` into a venv that sees nothing else, and asked to list the datasets from a folder
far from the repository: the cards must come from the wheel, not from the source tree.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def test_wheel_ships_cards_and_demo_weights_and_lists_datasets_from_a_fresh_venv(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs", "tests"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
          "-w", str(tmp_path / "dist"), str(source)])
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    cards = sorted(Path(n).name for n in names if n.startswith("bench/_cards/") and n.endswith(".json"))
    assert cards == sorted(p.name for p in (REPO / "datasets").glob("*.json"))
    assert "backbones/weights/ddpm_demo.safetensors" in names
    assert not any(n.startswith("datasets/") for n in names), "a top-level `datasets` package would shadow HF's"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--quiet", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BENCH_DATASETS_DIR")}
    env["BENCH_HOME"] = str(tmp_path / "home")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listed = _run([str(python), "-m", "bench.cli", "ls", "datasets", "--json"], cwd=elsewhere, env=env)
    assert {c["name"] for c in json.loads(listed.stdout)} == {p.stem for p in (REPO / "datasets").glob("*.json")}
    where = _run([str(python), "-c", "import bench.cards as c; print(c.cards_dir())"], cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv)
