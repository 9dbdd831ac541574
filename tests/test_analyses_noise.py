"""Table 5: the ddpm noise_mode option (shared / per_step / per_image) and `bench analyze noise`."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import bench
from backbones import _diffusion
from backbones.ddpm import DDPM
from bench.cli import main
from bench.errors import BenchError

S = 64


def tiny(**kwargs) -> DDPM:
    return bench.create_backbone("ddpm", **{**DDPM.tiny, "blocks": (6,), "steps": (10, 200), **kwargs})


def images(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, S, S), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_shared_mode_reuses_one_eps_for_every_step_and_image():
    bb = tiny()
    x = bb.preprocess(images(0))
    noises = bb.step_noises(x)
    assert all(n is bb.noise for n in noises) and bb.noise.shape == (1, 3, S, S)
    # the features are exactly q_sample with that one eps at each step
    maps = bb.forward_features(x)
    for i, t in enumerate(bb.steps):
        x_t = _diffusion.q_sample(x, t, bb.noise, bb._alphas_cumprod)
        ref = bb.model.forward_blocks(x_t, torch.full((2,), t, dtype=torch.long), bb.blocks)[0]
        assert (maps[i] - ref).abs().max().item() < 1e-4
    assert "noise_mode" not in bb.config()  # the default keeps every existing cache and run key


def test_per_step_mode_draws_one_eps_per_step_shared_by_all_images():
    a, b = tiny(noise_mode="per_step"), tiny(noise_mode="per_step")
    x = a.preprocess(images(0))
    na, nb = a.step_noises(x), b.step_noises(a.preprocess(images(1)))
    assert all(n.shape == (1, 3, S, S) for n in na)  # one eps for every image of the batch
    assert not torch.equal(na[0], na[1])  # a different eps per step
    assert all(torch.equal(u, v) for u, v in zip(na, nb))  # same seed, same eps, whatever the images
    assert not any(torch.equal(n, a.noise) for n in na)
    other_seed = tiny(noise_mode="per_step", seed=1).step_noises(x)
    assert not torch.equal(other_seed[0], na[0])
    assert a.config()["noise_mode"] == "per_step"


def test_per_image_mode_draws_from_the_image_content_not_the_batch():
    bb = tiny(noise_mode="per_image")
    batch = images(0, 3)
    noises = bb.step_noises(bb.preprocess(batch))
    assert noises[0].shape == (3, 3, S, S)
    assert not torch.equal(noises[0][0], noises[0][1])  # images get their own eps
    assert not torch.equal(noises[0][0], noises[1][0])  # and steps too
    alone = bb.step_noises(bb.preprocess(batch[1:2]))  # image 1 extracted alone: the same eps
    assert torch.equal(alone[0][0], noises[0][1]) and torch.equal(alone[1][0], noises[1][1])
    # features of an image do not depend on its batch companions (hence they can be cached by content)
    together = bb.extract(batch)
    single = bb.extract(batch[1:2])
    assert all((t[1] - s[0]).abs().max().item() < 1e-4 for t, s in zip(together, single))


def test_modes_give_different_features_and_different_cache_keys(tmp_path):
    from bench.features import FeatureStore

    batch = images(3)
    feats = {m: tiny(noise_mode=m).extract(batch) for m in ("shared", "per_step", "per_image")}
    for m in ("per_step", "per_image"):
        assert (feats[m][0] - feats["shared"][0]).abs().max().item() > 1e-3
    keys = {FeatureStore(tmp_path, tiny(noise_mode=m).config(), S).key for m in feats}
    assert len(keys) == 3


def test_bad_noise_mode_and_explicit_noise_with_a_mode_are_refused():
    with pytest.raises(BenchError, match=r"noise_mode must be one of shared, per_step, per_image, got 'fresh'"):
        tiny(noise_mode="fresh")
    with pytest.raises(BenchError, match=r"explicit noise tensor .* noise_mode='per_step'"):
        tiny(noise_mode="per_step", noise=torch.zeros(1, 3, S, S))


def test_analyze_noise_on_the_demo_writes_one_row_per_mode_and_reuses_features(tmp_path, capsys):
    argv = ["analyze", "noise", "--backbone", "ddpm", "--dataset", "demo", "--out", str(tmp_path),
            "--set", "blocks=[6]", "--set", "steps=50,150", "--max-train", "2", "--max-test", "2",
            "--members", "2", "--max-steps", "10", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    folder = tmp_path / "analyses" / "demo" / "noise"
    table = pd.read_csv(folder / "noise.csv")
    assert table["mode"].tolist() == ["shared", "per_step", "per_image"]
    assert table[["shared_train_test", "shared_across_steps"]].values.tolist() == [["+", "+"], ["+", "-"], ["-", "-"]]
    assert table["official_mean"].between(0, 100).all() and table["paper_mean"].isna().all()  # demo: no paper value
    runs = pd.read_csv(folder / "noise_runs.csv")
    assert runs["extracted_images"].tolist() == [4, 4, 4]  # each mode is its own feature set
    meta = json.loads((folder / "meta.json").read_text())
    assert [r["backbone_config"].get("noise_mode", "shared") for r in meta["runs"]] == ["shared", "per_step", "per_image"]
    assert len({r["run_key"] for r in meta["runs"]}) == 3 and (folder / "noise.png").stat().st_size > 0
    assert main(argv) == 0  # a re-run extracts nothing
    assert pd.read_csv(folder / "noise_runs.csv")["extracted_images"].tolist() == [0, 0, 0]


def test_analyze_noise_refuses_a_backbone_without_noise(capsys):
    assert main(["analyze", "noise", "--backbone", "pixels", "--dataset", "demo"]) == 2
    assert "draws no noise" in capsys.readouterr().err
