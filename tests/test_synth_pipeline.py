"""The synthetic-data pipeline end to end on tiny data: DatasetDDPM (shipped demo ADM), DatasetGAN
(random StyleGAN2), a SIGKILL mid-set resumed to byte-identical shards, DeepLab and the probe on the
set, results in the report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from baselines.deeplab_train import DeepLabConfig
from baselines.synth import SynthSpec, synthesize
from baselines.synth_train import TrainSpec, _paper, train_on_set
from bench.demo import render

REPO = Path(__file__).resolve().parents[1]


def _folder_dataset(root: Path, n_train: int = 2, n_test: int = 2) -> Path:
    """A user dataset of demo scenes (64 px, the demo's 9 classes), small enough for a fast interpreter."""
    names = ["sky", "ground", "body", "head", "ear", "eye", "leg", "tail", "ball"]
    for part, count, offset in (("train", n_train, 0), ("test", n_test, 100)):
        (root / part).mkdir(parents=True)
        for i in range(count):
            image, label = render(offset + i)
            Image.fromarray(image).save(root / part / f"{i:02d}.png")
            np.save(root / part / f"{i:02d}.npy", label)
    (root / "card.json").write_text(json.dumps({"name": "tiny_demo", "classes": names, "ignore_label": 255,
                                                "domain": "demo"}))
    return root


def _ddpm_spec(data: Path, home: Path, **kw) -> SynthSpec:
    args = dict(method="datasetddpm", dataset=str(data), num=4, backbone="ddpm.demo", sampler="ancestral",
                sample_steps=2, shard_size=2, batch_size=2, members=2, root=home / "synth", cache=home / "features",
                progress=False)
    args.update(kw)
    return SynthSpec(**args)


def test_datasetddpm_end_to_end_with_deeplab_and_the_report(tmp_path):
    data = _folder_dataset(tmp_path / "data")
    s = synthesize(_ddpm_spec(data, tmp_path))
    assert s.num == 4 and s.shards.done_starts() == [0, 2]
    image, label = s.sample(3)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and label.max() < 9
    assert s.scores().shape == (4,) and np.all(s.scores() >= 0)
    assert s.identity["source"]["sampler"] == {"kind": "ancestral", "steps": 2, "eta": 0.0, "clip_denoised": True}
    from safetensors import safe_open

    with safe_open(str(s.shards.path(2)), framework="np") as f:  # labels' bits depend on the thread count
        assert json.loads(f.metadata()["bench"])["torch_threads"] == torch.get_num_threads()
    # a larger set with the same key extends this one: its first shards are reused, not redrawn
    bigger = synthesize(_ddpm_spec(data, tmp_path, num=6))
    assert bigger.key == s.key and bigger.shards.path(0) == s.shards.path(0)

    spec = TrainSpec(dataset=str(data), model="deeplab", out=tmp_path / "reports", progress=False,
                     deeplab=DeepLabConfig(arch="small", epochs=2, batch_size=2, backbone_init="random"))
    result = train_on_set(s, spec)
    assert set(result["miou"]) == {"official", "standard"} and 0 <= result["miou"]["official"] <= 1
    assert result["synthetic"]["kept"] == 4  # floor(0.1 * 4) = 0 dropped
    assert result["model"]["best_epoch"] in (0, 1) and result["paper_miou"] is None
    again = train_on_set(s, spec)  # same key: reused, not retrained
    assert again["run_key"] == result["run_key"] and again["provenance"] == result["provenance"]
    from bench import report

    table = report.render(tmp_path / "reports", "md")
    assert "| datasetddpm |" in table

    probe = train_on_set(s, TrainSpec(dataset=str(data), model="probe", probe_images=2, out=tmp_path / "reports",
                                      name="ddpm-on-datasetddpm", progress=False))
    assert probe["num_train_images"] == 2 and probe["model"]["kind"] == "probe"


_KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_synth_pipeline import _ddpm_spec
from pathlib import Path
from baselines.synth import synthesize
synthesize(_ddpm_spec(Path({data!r}), Path({home!r}), num=8))
"""


def test_a_set_killed_mid_way_resumes_to_byte_identical_shards(tmp_path):
    data = _folder_dataset(tmp_path / "data")
    reference = synthesize(_ddpm_spec(data, tmp_path / "ref", num=8))
    env = dict(os.environ, BENCH_DISABLE_PLUGIN_AUTOLOAD="1")
    script = _KILL_SCRIPT.format(tests=str(REPO / "tests"), data=str(data), home=str(tmp_path / "run"))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env)
    shards = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "run" / "synth").glob("*/shards/*.safetensors"))
        if found:
            shards = found[0].parent
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert shards is not None, "the job never wrote a shard"
    written = sorted(p.name for p in shards.glob("*.safetensors"))
    assert 0 < len(written) < 4, written  # killed mid-way: some shards, not all
    resumed = synthesize(_ddpm_spec(data, tmp_path / "run", num=8))
    assert resumed.key == reference.key
    for start in range(0, 8, 2):
        assert resumed.shards.path(start).read_bytes() == reference.shards.path(start).read_bytes()
    assert not any(p.name.startswith(".tmp-") for p in shards.iterdir())


def _gan_kwargs():
    return {"z_dim": 16, "c_dim": 0, "w_dim": 16, "img_resolution": 64, "img_channels": 3,
            "mapping_kwargs": {"num_layers": 2}, "synthesis_kwargs": {"channel_base": 256, "channel_max": 16}}


def test_datasetgan_end_to_end_with_a_random_stylegan2(tmp_path):
    from backbones._stylegan2 import Generator

    data = _folder_dataset(tmp_path / "data")
    # annotated generated samples: W+ codes of the same (seeded) random generator, labels by a rule
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        G = Generator(**_gan_kwargs()).eval()
    annotated = tmp_path / "annotated"
    annotated.mkdir()
    with torch.no_grad():
        ws = G.mapping(torch.randn(3, 16, generator=torch.Generator().manual_seed(5)))
        img = G.synthesis(ws, noise_mode="const", return_features=False)
    for i in range(3):
        np.save(annotated / f"s{i}.latent.npy", ws[i].numpy())
        label = (img[i].mean(0) > img[i].mean()).numpy().astype(np.uint8)  # two classes by brightness
        label[:8] = 2
        np.save(annotated / f"s{i}.npy", label)
    spec = SynthSpec(method="datasetgan", dataset=str(data), num=4, generator_kwargs=_gan_kwargs(),
                     annotated=str(annotated), shard_size=2, batch_size=2, members=2, root=tmp_path / "synth",
                     cache=tmp_path / "features", progress=False)
    s = synthesize(spec)
    assert s.weights_source == "none" and s.shards.done_starts() == [0, 2]
    assert s.identity["source"]["truncation_psi"] == 0.7 and s.identity["source"]["noise_mode"] == "const"
    again = synthesize(spec)
    assert again.shards.path(2).read_bytes() == s.shards.path(2).read_bytes()
    result = train_on_set(s, TrainSpec(dataset=str(data), out=tmp_path / "reports", progress=False,
                                       deeplab=DeepLabConfig(arch="small", epochs=1, batch_size=2,
                                                             backbone_init="random")))
    assert result["arch"] == "datasetgan" and result["weights_source"] == "none"


def test_datasetgan_needs_annotated_samples(tmp_path):
    from bench.errors import BenchError

    data = _folder_dataset(tmp_path / "data")
    with pytest.raises(BenchError, match="--annotated"):
        synthesize(SynthSpec(method="datasetgan", dataset=str(data), num=2, shard_size=2,
                             generator_kwargs=_gan_kwargs(), root=tmp_path / "s"))


def test_bad_specs_fail_in_one_line_before_any_work(tmp_path):
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="did you mean 'datasetddpm'"):
        synthesize(SynthSpec(method="datasetdpm", dataset="demo", num=4))
    with pytest.raises(BenchError, match="multiple of the shard size"):
        synthesize(SynthSpec(method="datasetddpm", dataset="demo", num=150))


def test_paper_values_attach_only_under_the_paper_conditions():
    class FakeSet:
        weights_source = "official"

    paper = TrainSpec(dataset="cat15", deeplab=DeepLabConfig())
    assert _paper("datasetddpm", "cat_15", paper, FakeSet(), 50000, True) == [47.6, 1.5]
    assert _paper("datasetgan", "horse_21", paper, FakeSet(), 30000, True) == [45.4, 1.4]
    assert _paper("datasetddpm", "cat_15", paper, FakeSet(), 1000, True) is None  # a size the paper has not
    assert _paper("datasetddpm", "cat_15", paper, FakeSet(), 50000, False) is None  # random DeepLab init
    quirk = TrainSpec(dataset="cat15", deeplab=DeepLabConfig(), rule="official_offset30")
    assert _paper("datasetddpm", "cat_15", quirk, FakeSet(), 50000, True) is None
    small = TrainSpec(dataset="cat15", deeplab=DeepLabConfig(arch="small"))
    assert _paper("datasetddpm", "cat_15", small, FakeSet(), 50000, True) is None
    FakeSet.weights_source = "user"
    assert _paper("datasetddpm", "cat_15", paper, FakeSet(), 50000, True) is None
