"""Registry: built-ins, a third-party plugin through the entry point, did-you-mean, duplicates."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bench
from bench.errors import RegistryError


def test_builtins_are_listed_and_aliases_resolve():
    assert "pixels" in bench.list_backbones()
    assert bench.list_backbones("pix*") == ["pixels"]
    assert bench.create_backbone("rgb").name == "pixels"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(RegistryError, match=r"did you mean 'pixels'"):
        bench.create_backbone("pixel")
    with pytest.raises(RegistryError, match="unknown backbone 'zzzz'"):
        bench.create_backbone("zzzz")


def test_duplicate_name_names_both_origins():
    @bench.register_backbone("dup_test_name")
    class First(bench.Backbone):
        pass

    with pytest.raises(RegistryError) as err:

        @bench.register_backbone("dup_test_name")
        class Second(bench.Backbone):
            pass

    assert "First" in str(err.value) and "Second" in str(err.value)
    with pytest.raises(RegistryError, match="registered twice"):

        @bench.register_backbone("other_name", "pixels")  # alias clashing with a built-in name
        class Third(bench.Backbone):
            pass


def test_register_rejects_non_backbone():
    with pytest.raises(RegistryError, match="subclass of bench.Backbone"):
        bench.register_backbone("not_a_backbone")(object)


def _install_plugin_distribution(site: Path) -> None:
    """A separate distribution, as pip would install it: a module plus dist-info with entry points."""
    (site / "bench_thirdparty_plugin.py").write_text(textwrap.dedent('''
        import bench

        class Constant(bench.Backbone):
            """A third-party backbone: one constant channel."""

            @property
            def feature_info(self):
                return [bench.FeatureInfo("const", 1, 1)]

            def preprocess(self, images):
                return images.float()

            def forward_features(self, x):
                return [x[:, :1] * 0 + 7]
    '''))
    info = site / "bench_thirdparty_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bench-thirdparty-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[bench.backbones]\nthirdparty = bench_thirdparty_plugin:Constant\n")
    (info / "RECORD").write_text("")


def _python(code: str, site: Path, autoload: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("BENCH_DISABLE_PLUGIN_AUTOLOAD", None)
    if not autoload:
        env["BENCH_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_entry_point_plugin_is_found_lazily_and_can_be_switched_off(tmp_path):
    _install_plugin_distribution(tmp_path)
    code = textwrap.dedent('''
        import sys, torch, bench
        bench.create_backbone("pixels")
        print("lazy", "bench_thirdparty_plugin" not in sys.modules)
        bb = bench.create_backbone("thirdparty")
        print("maps", bb.extract(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))[0].flatten().tolist())
        print("listed", "thirdparty" in bench.list_backbones())
    ''')
    res = _python(code, tmp_path, autoload=True)
    assert res.returncode == 0, res.stderr
    assert "lazy True" in res.stdout
    assert "maps [7.0, 7.0, 7.0, 7.0]" in res.stdout
    assert "listed True" in res.stdout

    off = _python("import bench; print(bench.list_backbones())", tmp_path, autoload=False)
    assert off.returncode == 0, off.stderr
    assert "thirdparty" not in off.stdout and "pixels" in off.stdout
