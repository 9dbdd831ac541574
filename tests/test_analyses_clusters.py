"""bench analyze clusters: our k-means (seeded k-means++ + Lloyd) and the numbers behind the cluster maps."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import helpers
import torch

from bench.analyses import clusters
from bench.analyses.clusters import assign, kmeans
from bench.cli import build_parser
from bench.errors import BenchError


def _blobs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0, 0, 0], [10, 0, 0, 0], [0, 10, 0, 0], [0, 0, 10, 10], [8, 8, 8, 8]])
    sizes = [60, 50, 40, 30, 20]
    x = torch.cat([c + torch.randn(n, 4, generator=g) for c, n in zip(centres, sizes)])
    truth = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    perm = torch.randperm(len(x), generator=g)
    return x[perm], truth[perm], centres


def test_kmeans_recovers_separable_clusters_numbered_by_size():
    x, truth, centres = _blobs()
    labels, found, inertia = kmeans(x, 5, seed=3)
    # same partition as the truth: each true blob is one cluster, and the blobs are sized 60 > 50 > ... > 20
    assert torch.equal(labels, truth)
    assert torch.allclose(found, centres, atol=0.5)
    assert inertia == pytest.approx(float(((x - found[labels]) ** 2).sum()), rel=1e-4)
    assert torch.equal(assign(x, found, chunk=7), labels)  # chunked assignment agrees


def test_kmeans_is_seeded_and_handles_degenerate_input():
    x, _, _ = _blobs(1)
    a = kmeans(x, 3, seed=11)
    b = kmeans(x, 3, seed=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    same = torch.zeros(10, 3)  # fewer distinct points than clusters: no crash, every point placed
    labels, centres, inertia = kmeans(same, 4, seed=0)
    assert labels.shape == (10,) and inertia == 0.0 and torch.isfinite(centres).all()
    with pytest.raises(BenchError, match="k=5"):
        kmeans(torch.zeros(3, 2), 5)


def test_clusters_command_writes_maps_and_consistent_counts(tmp_path):
    argv = ["analyze", "clusters", "--dataset", "demo", "--blocks", "6,8", "--steps", "50", "--k", "4",
            "--images", "2", "--max-train", "1", "--max-test", "2", "--max-pixels", "5000", "--out", str(tmp_path),
            "--device", "cpu", "--no-progress"]
    args = build_parser(argv).parse_args(argv)
    assert clusters.main(args) == 0
    folder = tmp_path / "analyses" / "demo" / "clusters"
    summary = pd.read_csv(folder / "clusters.csv")
    sizes = pd.read_csv(folder / "cluster_sizes.csv")
    data = np.load(folder / "clusters.npz")
    assert data["maps"].shape == (2, 2, 64, 64) and data["images"].shape == (2, 64, 64, 3)
    assert list(dict.fromkeys(summary["map"])) == ["t50.b6", "t50.b8"]
    for m, name in enumerate(["t50.b6", "t50.b8"]):
        rows = summary[summary["map"] == name].sort_values("cluster")
        assert rows["cluster"].tolist() == [0, 1, 2, 3]
        counts = np.bincount(data["maps"][m].ravel(), minlength=4)
        assert rows["pixels"].tolist() == counts.tolist()  # the CSV holds the drawn maps' counts
        assert rows["pixels"].sum() == 2 * 64 * 64 and abs(rows["share"].sum() - 1) < 1e-9
        per_image = sizes[sizes["map"] == name].groupby("cluster")["pixels"].sum()
        assert per_image.tolist() == counts.tolist()
        assert rows["majority_share"].between(0, 1).all()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["k"] == 4 and meta["init"] == "k-means++" and len(meta["images"]) == 2
    (folder / "clusters.png").unlink()
    assert clusters.redraw(folder)[-1].name == "clusters.png" and (folder / "clusters.png").exists()


def test_a_second_clusters_run_reads_the_cached_features(tmp_path, monkeypatch):
    from backbones.ddpm import DDPM

    seen = helpers.count_images_through(monkeypatch, DDPM)
    argv = ["analyze", "clusters", "--dataset", "demo", "--blocks", "8", "--steps", "50", "--k", "3", "--images", "2",
            "--max-train", "1", "--max-test", "2", "--max-pixels", "3000", "--out", str(tmp_path), "--device", "cpu",
            "--no-progress"]
    assert clusters.main(build_parser(argv).parse_args(argv)) == 0
    first = np.load(tmp_path / "analyses" / "demo" / "clusters" / "clusters.npz")["maps"]
    assert sum(seen) > 0
    seen.clear()
    assert clusters.main(build_parser(argv).parse_args(argv)) == 0
    assert seen == []  # nothing went through the UNet again
    assert np.array_equal(np.load(tmp_path / "analyses" / "demo" / "clusters" / "clusters.npz")["maps"], first)
