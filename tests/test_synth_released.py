"""Released synthetic sets (.npz, spec §3.5, C13): streamed into shards, pickles refused."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from baselines.released import import_released
from bench.errors import ArchiveError, BenchError


def _npz(path, n=7, size=8, classes=9, extra=None):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
              rng.integers(0, classes, (n, size, size), dtype=np.uint8)]
    arrays += list(extra or [])
    arrays.append(rng.random(n).astype(np.float32))
    np.savez(path, *arrays)
    return arrays


def test_a_released_ddpm_set_becomes_shards_with_the_same_content(tmp_path):
    arrays = _npz(tmp_path / "samples_256x256x3.npz")
    s = import_released(tmp_path / "samples_256x256x3.npz", "datasetddpm", "demo", shard_size=3,
                        root=tmp_path / "synth", progress=False)
    assert s.num == 7 and s.shards.done_starts() == [0, 3, 6]  # the last shard holds the remainder
    assert np.array_equal(s.scores(), arrays[2])
    image, label = s.sample(4)
    assert np.array_equal(image, arrays[0][4]) and np.array_equal(label, arrays[1][4])
    again = import_released(tmp_path / "samples_256x256x3.npz", "datasetddpm", "demo", shard_size=3,
                            root=tmp_path / "synth", progress=False)
    assert again.key == s.key  # idempotent: nothing rewritten


def test_the_gan_layout_with_latents_takes_the_last_array_as_scores(tmp_path):
    arrays = _npz(tmp_path / "gan.npz", extra=[np.zeros((7, 14, 512), np.float32)])
    s = import_released(tmp_path / "gan.npz", "datasetgan", "demo", shard_size=4, root=tmp_path / "s", progress=False)
    assert np.array_equal(s.scores(), arrays[-1])


def test_a_released_tarball_is_extracted_safely(tmp_path):
    _npz(tmp_path / "samples_256x256x3.npz")
    tar = tmp_path / "demo.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(tmp_path / "samples_256x256x3.npz", arcname="demo/samples_256x256x3.npz")
    s = import_released(tar, "datasetddpm", "demo", shard_size=7, root=tmp_path / "s", progress=False)
    assert s.num == 7
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as t:
        info = tarfile.TarInfo("../escape.npz")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ArchiveError):
        import_released(evil, "datasetddpm", "demo", root=tmp_path / "s2", progress=False)
    assert not (tmp_path / "s2" / "escape.npz").exists() and not (tmp_path / "escape.npz").exists()


def test_c13_an_npz_with_pickled_objects_is_refused(tmp_path):
    objects = np.empty(7, dtype=object)
    objects[:] = [{"x": i} for i in range(7)]
    np.savez(tmp_path / "evil.npz", objects, np.zeros((7, 8, 8), np.uint8), np.zeros(7, np.float32))
    with pytest.raises(BenchError, match="Python objects"):
        import_released(tmp_path / "evil.npz", "datasetddpm", "demo", root=tmp_path / "s", progress=False)


def test_labels_outside_the_card_are_named(tmp_path):
    _npz(tmp_path / "bad.npz", classes=40)
    with pytest.raises(BenchError, match="not a class of demo"):
        import_released(tmp_path / "bad.npz", "datasetddpm", "demo", shard_size=7, root=tmp_path / "s", progress=False)
