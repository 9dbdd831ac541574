"""Results you can trust (issue 8): every class of silently wrong number, each shown impossible.

Runs are tiny (pixels or a tiny random ADM, 2 train / 1 test images, 2 ensemble members): these
tests are about which numbers are reused, labelled and attached, not about their quality.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench
from bench import report
from bench.cli import main
from bench.errors import CheckpointError, DatasetError, ResultConflictError
from bench.features import FeatureStore
from bench.results import PeakMemory, write_json_atomic
from bench.runner import RunSpec, run

TINY = dict(bench.get_backbone_class("ddpm").tiny["arch"])


def _spec(out: Path, backbone: str = "pixels", **kw) -> RunSpec:
    base = dict(dataset="demo", seed=0, out=out, progress=False, max_train=2, max_test=1, members=2)
    base.update(kw)
    return RunSpec(backbone=backbone, **base)


def _tiny_weights(path: Path, seed: int = 1) -> Path:
    """A trained-looking tiny ADM checkpoint: random tensors, architecture in the safetensors header."""
    from backbones._adm_unet import ADMFlags, ADMUNet
    from bench.checkpoints import save_safetensors

    torch.manual_seed(seed)
    net = ADMUNet(ADMFlags.from_dict(TINY))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)  # zero-initialised output layers would make every checkpoint alike
    save_safetensors({k: v.contiguous() for k, v in net.state_dict().items()}, path,
                     metadata={"bench_arch": json.dumps(TINY)})
    return path


def _folder_dataset(root: Path, *, size: tuple[int, int] = (16, 16), n: int = 2, seed: int = 0,
                    card: dict | None = None) -> Path:
    """A user folder: ``train``/``test`` with PNG images and ``.npy`` labels (two halves, two classes)."""
    rng = np.random.default_rng(seed)
    width, height = size
    for part in ("train", "test"):
        (root / part).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / part / f"{i}.png")
            label = np.zeros((height, width), np.uint8)
            label[:, width // 2:] = 1
            np.save(root / part / f"{i}.npy", label)
    (root / "card.json").write_text(json.dumps(card or {"classes": ["left", "right"], "ignore_label": 255}))
    return root


# ---- 1. stale results ------------------------------------------------------------------------------

def test_a_result_is_reused_only_under_an_equal_run_key(tmp_path):
    weights = _tiny_weights(tmp_path / "w.safetensors")
    spec = _spec(tmp_path / "out", "ddpm", backbone_kwargs={"checkpoint": str(weights), "blocks": [5]})
    first = run(spec)
    assert run(spec)["run_key"] == first["run_key"]  # same everything: reused
    other = _spec(tmp_path / "out", "ddpm", backbone_kwargs={"checkpoint": str(weights), "blocks": [6]})
    with pytest.raises(ResultConflictError, match=r"another configuration .*blocks.*--overwrite"):
        run(other)
    # another --name keeps both; --overwrite replaces
    named = run(_spec(tmp_path / "out", "ddpm", name="ddpm-b6", backbone_kwargs=other.backbone_kwargs))
    assert named["config"]["backbone"]["blocks"] == [6]
    replaced = run(_spec(tmp_path / "out", "ddpm", overwrite=True, backbone_kwargs=other.backbone_kwargs))
    assert replaced["run_key"] != first["run_key"] and replaced["config"]["backbone"]["blocks"] == [6]
    # a check-sized run (2 -> 1 training images) under the label of a real run is refused, not served
    with pytest.raises(ResultConflictError, match="max_train"):
        run(_spec(tmp_path / "out", "ddpm", max_train=1, backbone_kwargs=other.backbone_kwargs))


def test_a_garbage_weights_file_is_always_opened_and_refused(tmp_path):
    weights = _tiny_weights(tmp_path / "w.safetensors")
    run(_spec(tmp_path / "out", "ddpm", backbone_kwargs={"checkpoint": str(weights)}))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        run(_spec(tmp_path / "out", "ddpm", backbone_kwargs={"checkpoint": str(garbage)}))
    other = _tiny_weights(tmp_path / "other.safetensors", seed=2)
    with pytest.raises(ResultConflictError, match="weights_sha256"):
        run(_spec(tmp_path / "out", "ddpm", backbone_kwargs={"checkpoint": str(other)}))


# ---- 2. controls never load weights -------------------------------------------------------------------

def test_a_random_init_control_ignores_the_weights_tensors(tmp_path):
    weights = _tiny_weights(tmp_path / "w.safetensors")
    with_file = run(_spec(tmp_path / "a", "ddpm", pretrained=False, backbone_kwargs={"checkpoint": str(weights)}))
    plain = run(_spec(tmp_path / "b", "ddpm", pretrained=False, backbone_kwargs={"arch": TINY}))
    trained = run(_spec(tmp_path / "c", "ddpm", backbone_kwargs={"checkpoint": str(weights)}))
    assert with_file["miou"] == plain["miou"] and with_file["per_class_iou"] == plain["per_class_iou"]
    assert with_file["provenance"]["weights_sha256"] == "" and with_file["weights_source"] == "none"
    assert trained["provenance"]["weights_sha256"] and trained["weights_source"] == "user"
    # the control's features are the random ones, bit for bit; the trained run's are not
    def first_map(result: dict) -> np.ndarray:
        return np.load(sorted(Path(result["config"]["feature_cache"]).rglob("m0.npy"))[0])

    assert np.array_equal(first_map(with_file), first_map(plain))
    assert not np.array_equal(first_map(trained), first_map(plain))


# ---- 3. --name with several backbones -------------------------------------------------------------

def test_one_name_for_several_backbones_is_refused(tmp_path, capsys):
    code = main(["run", "--backbone", "pixels,ddpm", "--name", "mine", "--dataset", "demo", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--name 'mine'" in err[0]
    assert not (tmp_path / "runs").exists()


# ---- 4. paper values only for the official weights ------------------------------------------------

def _fake_result(out: Path, *, label: str, dataset: str, seed, split: str = "resplit", miou: float = 0.5,
                 weights_source: str = "official", tag: str | None = "lsun_cat", config_key: str = "c1",
                 pretrained: bool = True) -> None:
    name = f"seed{seed if split == 'resplit' else 'released'}.json"
    write_json_atomic(out / "runs" / dataset / label / name, {
        "schema": "bench.run/2", "backbone": label, "arch": "ddpm", "tag": tag, "pretrained": pretrained,
        "weights_source": weights_source, "dataset": dataset, "split": split,
        "seed": seed if split == "resplit" else None, "config_key": config_key,
        "miou": {"official": miou, "standard": miou + 0.1}, "provenance": {"weights_sha256": "ab" * 32},
    })


def test_paper_values_attach_only_to_official_weights(tmp_path):
    for seed in range(2):
        _fake_result(tmp_path, label="ddpm", dataset="cat_15", seed=seed)
        _fake_result(tmp_path, label="mine", dataset="cat_15", seed=seed, weights_source="user")
        _fake_result(tmp_path, label="ddpm-random", dataset="cat_15", seed=seed, weights_source="none",
                     pretrained=False)
    df = report.collect(tmp_path).set_index("backbone")
    assert df.loc["ddpm", "paper_mean"] == 53.7
    assert np.isnan(df.loc["mine", "paper_mean"]) and np.isnan(df.loc["ddpm-random", "paper_mean"])


def test_the_runner_attaches_no_tag_to_a_users_weights(tmp_path):
    weights = _tiny_weights(tmp_path / "w.safetensors")
    result = run(_spec(tmp_path, "ddpm", backbone_kwargs={"checkpoint": str(weights)}))
    assert result["tag"] is None and result["weights_source"] == "user"  # the demo tag was not picked


# ---- 5. feature cache keyed by content ----------------------------------------------------------------

def test_feature_cache_follows_image_content_not_folder_names(tmp_path):
    a = _folder_dataset(tmp_path / "a" / "data", seed=1)
    b = _folder_dataset(tmp_path / "b" / "data", seed=2)
    cache = tmp_path / "cache"
    ra = run(_spec(tmp_path / "ra", dataset=str(a), cache=cache, split="released"))
    rb = run(_spec(tmp_path / "rb", dataset=str(b), cache=cache, split="released"))
    entries = lambda: sorted(p.parent.name for p in cache.rglob("done"))  # noqa: E731
    assert len(entries()) == 6  # 3 images each (2 train + 1 test), none shared
    assert ra["run_key"] != rb["run_key"]
    # editing one image: a new entry and a new run key (the old result is not served)
    image = a / "test" / "0.png"
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(image)
    with pytest.raises(ResultConflictError, match="files"):
        run(_spec(tmp_path / "ra", dataset=str(a), cache=cache, split="released"))
    run(_spec(tmp_path / "ra", dataset=str(a), cache=cache, split="released", overwrite=True))
    assert len(entries()) == 7


def test_feature_cache_key_includes_the_plugins_feature_version(tmp_path, monkeypatch):
    pixels = bench.get_backbone_class("pixels")
    before = FeatureStore(tmp_path, bench.create_backbone("pixels").config(), 16).folder
    monkeypatch.setattr(pixels, "feature_version", pixels.feature_version + 1)
    after = FeatureStore(tmp_path, bench.create_backbone("pixels").config(), 16).folder
    assert before != after


# ---- 6, 7. report: released split apart, no delta for the standard metric ------------------------------

def test_released_split_has_its_own_column_and_standard_has_no_delta(tmp_path):
    for seed in range(5):
        _fake_result(tmp_path, label="ddpm", dataset="cat_15", seed=seed, miou=0.5)
    _fake_result(tmp_path, label="ddpm", dataset="cat_15", seed=0, split="released", miou=0.9)
    df = report.collect(tmp_path)
    resplit = df[df["split"] == "resplit"].iloc[0]
    assert resplit["n"] == 5 and resplit["mean"] == pytest.approx(50.0)
    md = report.render(tmp_path, "md")
    assert "Cat-15 (released split)" in md and "90.0" in md
    standard = report.render(tmp_path, "md", variant="standard")
    assert "paper" not in standard.split("\n\n")[0] and "Δ" not in standard


def test_results_of_two_configs_under_one_label_are_not_averaged(tmp_path):
    _fake_result(tmp_path, label="ddpm", dataset="cat_15", seed=0, config_key="aaaaaaaaaa", miou=0.1)
    _fake_result(tmp_path, label="ddpm", dataset="cat_15", seed=1, config_key="bbbbbbbbbb", miou=0.9)
    df = report.collect(tmp_path)
    assert len(df) == 2 and set(df["n"]) == {1}
    assert {"ddpm [config aaaaaaaa]", "ddpm [config bbbbbbbb]"} == set(df["backbone"])


# ---- 8. label ids the label format cannot hold --------------------------------------------------------

def test_a_card_with_more_classes_than_uint8_labels_hold_is_refused(tmp_path):
    root = _folder_dataset(tmp_path / "big", card={"classes": [f"c{i}" for i in range(300)], "ignore_label": 255})
    with pytest.raises(DatasetError, match=r"300 classes .* uint8"):
        bench.data.get_card(str(root))
    ok = _folder_dataset(tmp_path / "ok", card={"classes": [f"c{i}" for i in range(255)], "ignore_label": 255})
    assert bench.data.get_card(str(ok)).num_classes == 255


# ---- 9. per-run peak memory -----------------------------------------------------------------------------

def _touch_fresh_pages(nbytes: int) -> None:
    # Fresh anonymous pages, touched, then unmapped. np.ones goes through the allocator, which may hand
    # back pages that are already resident (most likely what CI saw: its 400 MiB did not move the peak);
    # then the process RSS, and so its peak, does not move, which is true of RSS but tests nothing.
    import mmap

    m = mmap.mmap(-1, nbytes)
    pages = np.frombuffer(m, dtype=np.uint8)
    pages[:: mmap.PAGESIZE] = 1
    del pages
    m.close()


def test_peak_memory_is_measured_per_run(tmp_path):
    with PeakMemory("cpu") as first:
        _touch_fresh_pages(400 * 2**20)
    with PeakMemory("cpu") as second:
        pass
    assert first.rss_bytes > 400 * 2**20  # the run's pages were seen, whichever method
    if second.method.startswith("VmHWM"):
        assert first.rss_bytes - second.rss_bytes > 300 * 2**20
    else:  # pragma: no cover - non-Linux: the process peak is all there is, and the result says so
        assert second.method == "process ru_maxrss"


def test_a_high_water_mark_reset_that_is_ignored_is_not_reported_as_per_run(monkeypatch):
    # The write to clear_refs accepted and ignored: the mark stays at an earlier test's peak.
    import bench.results as results

    fake = {"VmHWM": 1855442944, "VmRSS": 1200 * 2**20}
    monkeypatch.setattr(results, "_status_kib", lambda field: fake[field])
    monkeypatch.setattr(results, "_hwm_is_live", lambda: True)
    with PeakMemory("cpu") as stuck:
        pass
    assert stuck.method == "process ru_maxrss"
    fake["VmHWM"] = fake["VmRSS"] + 2**20  # a reset that worked: the mark sits at the current RSS
    with PeakMemory("cpu") as reset:
        pass
    assert reset.method == "VmHWM since run start" and reset.rss_bytes == fake["VmHWM"]


def test_a_high_water_mark_that_does_not_follow_new_pages_is_not_trusted(monkeypatch):
    # A mark that sits at the RSS after the reset but never rises: the probe must catch it.
    import bench.results as results

    monkeypatch.setattr(results, "_status_kib", lambda field: 900 * 2**20)
    monkeypatch.setattr(results, "_reset_hwm", lambda: True)
    assert results._probe_hwm() is False
    results._hwm_is_live.cache_clear()  # probe again, under the fake /proc
    try:
        with PeakMemory("cpu") as peak:
            pass
    finally:
        results._hwm_is_live.cache_clear()  # the real /proc is probed afresh by the next user
    assert peak.method == "process ru_maxrss"


def test_this_kernels_high_water_mark_probe_agrees_with_a_real_allocation():
    import bench.results as results

    if not results._probe_hwm():
        pytest.skip("this kernel's VmHWM cannot be reset or does not follow new pages")
    assert results._reset_hwm()
    start = results._status_kib("VmRSS")
    _touch_fresh_pages(128 * 2**20)
    assert results._vm_hwm() - start >= 120 * 2**20


# ---- 10. every file checked before any work ------------------------------------------------------------

def test_a_broken_test_label_fails_before_extraction(tmp_path):
    root = _folder_dataset(tmp_path / "d")
    np.save(root / "test" / "1.npy", np.zeros((8, 8), np.uint8))  # wrong size, test split only
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=r"1\.npy is 8x8 but its image .* is 16x16"):
        run(_spec(tmp_path / "out", dataset=str(root), cache=cache, split="released", max_test=None))
    assert not cache.exists()  # no feature was extracted
    np.save(root / "test" / "1.npy", np.full((16, 16), 0.5))  # fractional ids
    with pytest.raises(DatasetError, match="not uint8 class ids: 0.5"):
        run(_spec(tmp_path / "out", dataset=str(root), cache=cache, split="released", max_test=None))


# ---- 11, 12. one-line errors, exit codes, --version, help -------------------------------------------

@pytest.mark.parametrize("argv, code, words", [
    (["run", "--backbone", "pixels", "--set", "bogus=1"], 2, "has no setting 'bogus'"),
    (["run", "--backbone", "ddpm", "--set", "blokcs=5"], 2, "did you mean 'blocks'"),
    (["run", "--backbone", "pixels", "--max-memory", "inf"], 2, "positive finite number"),
    (["run", "--backbone", "pixels", "--max-memory", "nan"], 2, "positive finite number"),
    (["run", "--backbone", "nosuch"], 2, "unknown backbone"),
    (["run", "--backbone", "ddpm", "--weights", "/nonexistent.pt"], 2, "no such file"),
])
def test_usage_errors_are_one_line_with_exit_2(argv, code, words, tmp_path, capsys):
    with pytest.raises(SystemExit) if "--max-memory" in argv else contextlib.nullcontext():
        result = main(argv + ["--out", str(tmp_path / "out")])
        assert result == code
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and not any("Traceback" in line for line in err)
    assert not (tmp_path / "out" / "runs").exists()


def test_out_that_is_a_file_or_read_only_fails_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", "--backbone", "pixels", "--seeds", "0", "--out", str(blocker / "sub")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert not (Path(bench.hub.bench_home()) / "features").exists()


def test_runtime_failures_exit_1(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "d")
    (root / "test" / "1.npy").unlink()
    assert main(["run", "--backbone", "pixels", "--dataset", str(root), "--split", "released",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bench: error:") and "1.npy" in err[-1] and "is missing" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_version_and_help_on_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"bench {bench.__version__}"
    from bench.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [f"{name} {action.dest}" for name, sub in subparsers.choices.items() for action in sub._actions
               if action.dest != "help" and not action.help]
    assert missing == []
    from bench.analyses import ANALYSES

    for name in ANALYSES:  # each analysis declares its options only when asked for: walk each one
        top = build_parser(["analyze", name])
        analyze = next(a for a in top._actions if a.__class__.__name__ == "_SubParsersAction").choices["analyze"]
        one = next(a for a in analyze._actions if a.__class__.__name__ == "_SubParsersAction").choices[name]
        assert len(one._actions) > 1, f"bench analyze {name} declares no options"
        missing = [f"analyze {name} {a.dest}" for a in one._actions if a.dest != "help" and not a.help]
        assert missing == []


# ---- 20. fp32 feature cache -------------------------------------------------------------------------

def test_the_cache_dtype_is_a_setting_with_its_own_key(tmp_path):
    half = run(_spec(tmp_path, "pixels", cache_dtype="float16"))
    full = run(_spec(tmp_path, "pixels", cache_dtype="float32", name="pixels-fp32"))
    assert half["run_key"] != full["run_key"] and full["config"]["cache_dtype"] == "float32"
    stored = np.load(next(Path(full["config"]["feature_cache"]).rglob("m0.npy")))
    assert stored.dtype == np.float32


# ---- 21. non-square photos -------------------------------------------------------------------------

def test_non_square_photos_run_and_are_scored_at_the_labels_resolution(tmp_path):
    root = _folder_dataset(tmp_path / "photos", size=(40, 30))
    card = bench.data.get_card(str(root))
    assert card.resolution == 30  # the shorter side: the model's square input
    stretched = run(_spec(tmp_path / "s", dataset=str(root), split="released"))
    assert stretched["geometry"]["fit"] == "stretch" and stretched["num_scored_pixels"] == 40 * 30
    cropped = run(_spec(tmp_path / "c", dataset=str(root), split="released", fit="crop"))
    assert cropped["geometry"]["fit"] == "crop" and cropped["num_scored_pixels"] == 30 * 30
    assert stretched["run_key"] != cropped["run_key"]


# ---- 16. no progress bars in logs ---------------------------------------------------------------------

def test_off_a_terminal_progress_is_a_few_status_lines(tmp_path):
    import os
    import subprocess
    import sys

    root = _folder_dataset(tmp_path / "d")
    env = dict(os.environ, BENCH_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--backbone", "pixels", "--dataset", str(root),
                           "--split", "released", "--out", str(tmp_path / "out"), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "it/s" not in done.stderr  # no tqdm redraws in a log
    lines = done.stderr.strip().splitlines()
    assert any(line.startswith("pixels features: 4/4 img") for line in lines)
    assert len(lines) < 12, lines


def test_cache_folders_that_are_dangling_links_or_files_are_one_line_errors(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("BENCH_HOME", str(home))
    (home / "datasets").symlink_to(tmp_path / "nowhere")
    assert main(["run", "--backbone", "pixels", "--seeds", "0", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "is a symlink to" in err[-1] and "does not exist" in err[-1]
    (home / "datasets").unlink()
    (tmp_path / "elsewhere").mkdir()
    (home / "datasets").symlink_to(tmp_path / "elsewhere")  # a link to a real folder is fine
    assert bench.data.dataset_root(bench.data.get_card("demo")).parent.resolve() == (tmp_path / "elsewhere").resolve()
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "o" / "file"))
    (tmp_path / "o").mkdir(exist_ok=True)
    (tmp_path / "o" / "file").write_text("x")
    assert main(["run", "--backbone", "pixels", "--seeds", "0", "--out", str(tmp_path / "o2")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_weights_of_another_domain_are_never_picked_silently():
    from bench.runner import _pick_tag

    ddpm, dinov2 = bench.get_backbone_class("ddpm"), bench.get_backbone_class("dinov2")
    cat, demo = bench.data.get_card("cat15"), bench.data.get_card("demo")
    assert _pick_tag(ddpm, None, cat, user_weights=False, pretrained=True) == "lsun_cat"
    mae = bench.get_backbone_class("mae")
    with pytest.raises(bench.BenchError, match=r"mae has no official weights for the domain 'demo'.*mae\.lsun_bedroom"):
        _pick_tag(mae, None, demo, user_weights=False, pretrained=True)
    assert _pick_tag(mae, "lsun_cat", demo, user_weights=False, pretrained=True) == "lsun_cat"  # asked for by name
    assert _pick_tag(mae, None, demo, user_weights=False, pretrained=False) == mae.default_tag  # a control
    assert _pick_tag(dinov2, None, cat, user_weights=False, pretrained=True) == dinov2.default_tag  # generic weights
