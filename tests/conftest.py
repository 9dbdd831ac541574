"""Shared test setup: no plugin autoload from the environment, a private cache, few threads."""
from __future__ import annotations

import os

import pytest

# Tests see exactly the built-in backbones unless a test installs a plugin itself.
os.environ.setdefault("BENCH_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own BENCH_HOME: nothing leaks into the user's cache or between tests."""
    monkeypatch.setenv("BENCH_HOME", str(tmp_path_factory.mktemp("bench_home")))


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # Tests run tiny models: one thread avoids OpenMP synchronisation costs that make small ops
    # 10-100x slower when the cores are shared (CI machines, a parallel job).
    import torch

    torch.set_num_threads(1)
