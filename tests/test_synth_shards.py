"""The shard writer: a kill at every stage of a write leaves no shard, a resume writes the same bytes."""
from __future__ import annotations

import os

import numpy as np
import pytest
import safetensors.numpy

import baselines.shards as shards_mod
from baselines.shards import ShardStore
from bench.errors import BenchError


def _data(n: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 9, (n, 8, 8), dtype=np.uint8),
            rng.random(n).astype(np.float32))


class Killed(BaseException):
    """Stands for SIGINT/SIGTERM arriving in the middle of a write (a BaseException, like KeyboardInterrupt)."""


def _reference_bytes(tmp_path) -> bytes:
    return ShardStore(tmp_path / "reference").write(0, *_data(), meta={"set": "k"}).read_bytes()


def _half_written(real):
    def fake(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the process dies half-way through the file
            f.truncate(os.path.getsize(filename) // 2)
        raise Killed()
    return fake


STAGES = {
    "while writing": lambda mp: mp.setattr(safetensors.numpy, "save_file", _half_written(safetensors.numpy.save_file)),
    "before fsync": lambda mp: mp.setattr(shards_mod.os, "fsync", lambda fd: (_ for _ in ()).throw(Killed())),
    "while hashing": lambda mp: mp.setattr(shards_mod, "_sha256", lambda p: (_ for _ in ()).throw(Killed())),
    "before rename": lambda mp: mp.setattr(shards_mod.os, "replace", lambda a, b: (_ for _ in ()).throw(Killed())),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_kill_at_any_stage_leaves_no_shard_and_the_rewrite_is_identical(tmp_path, monkeypatch, stage):
    expected = _reference_bytes(tmp_path)
    store = ShardStore(tmp_path / "set")
    with monkeypatch.context() as mp:
        STAGES[stage](mp)
        with pytest.raises(Killed):
            store.write(0, *_data(), meta={"set": "k"})
    assert store.done_starts() == []
    assert list(store.folder.iterdir()) == []  # not even a temporary file
    path = store.write(0, *_data(), meta={"set": "k"})
    assert path.read_bytes() == expected
    store.verify(0)


def test_a_hard_kill_leaves_only_a_temporary_file_which_the_next_start_removes(tmp_path):
    store = ShardStore(tmp_path / "set")
    store.write(0, *_data())
    leftover = store.folder / f".tmp-{3:09d}-12345"
    leftover.write_bytes(b"half a shard")  # what SIGKILL leaves: no handler ran
    assert store.done_starts() == [0]
    assert store.clean_partial() == 1 and not leftover.exists()
    assert store.done_starts() == [0]


def test_a_finished_shard_is_never_rewritten(tmp_path):
    store = ShardStore(tmp_path / "set")
    first = store.write(0, *_data(seed=0))
    stamp = first.stat().st_mtime_ns
    again = store.write(0, *_data(seed=1))  # other content for the same start: the finished one stands
    assert again == first and first.stat().st_mtime_ns == stamp


def test_shard_names_carry_their_content_hash_and_corruption_is_named(tmp_path):
    store = ShardStore(tmp_path / "set")
    path = store.write(0, *_data())
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BenchError, match=path.name):
        store.verify(0)


def test_reads_return_what_was_written(tmp_path):
    images, labels, scores = _data(5)
    store = ShardStore(tmp_path / "set")
    store.write(10, images, labels, scores)
    back = store.read(10)
    assert np.array_equal(back["images"], images) and np.array_equal(back["labels"], labels)
    assert back["index"].tolist() == [10, 11, 12, 13, 14]
    image, label = store.read_sample(10, 3)
    assert np.array_equal(image, images[3]) and np.array_equal(label, labels[3])
    assert [s.tolist() for _, s in store.iter_scores()] == [scores.tolist()]


@pytest.mark.parametrize("bad", [
    dict(images=np.zeros((2, 8, 8, 3), np.float32)),
    dict(labels=np.zeros((2, 8, 7), np.uint8)),
    dict(scores=np.zeros(3, np.float32)),
])
def test_bad_arrays_are_refused_before_anything_is_written(tmp_path, bad):
    args = dict(images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.zeros((2, 8, 8), np.uint8),
                scores=np.zeros(2, np.float32))
    args.update(bad)
    store = ShardStore(tmp_path / "set")
    with pytest.raises(BenchError):
        store.write(0, **args)
    assert list(store.folder.iterdir()) == []
