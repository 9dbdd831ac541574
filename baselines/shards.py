"""A synthetic labelled set on disk: content-addressed shards, each written whole or not at all.

Layout of one set (``root`` is the set's folder, named by the set key, see :mod:`baselines.synth`)::

    set.json                                   what produced the set (written first, atomically)
    shards/<start:09d>-<sha256[:16]>.safetensors
                                               samples [start, start + n): images uint8 [n, H, W, 3],
                                               labels uint8 [n, H, W], scores float32 [n], index int64 [n]

A shard is written to a hidden temporary file in ``shards/``, flushed and fsynced, then renamed to
its final name, which carries the sha256 of its bytes: a killed job leaves no half shard (only a
temporary file, removed on the next start), a finished shard is never written again, and a shard
whose bytes do not match its name is reported instead of read. Safetensors, so reading executes
nothing, and slices are read lazily: memory stays flat however many samples a set holds.

Byte-identical resumes need identical bytes for identical content: the safetensors header is
deterministic for a fixed set of tensors, except for the metadata map, whose key order the writer
does not fix, so a shard carries exactly one metadata key (``bench``: canonical JSON).

Example:
    >>> import tempfile, numpy as np
    >>> shards = ShardStore(Path(tempfile.mkdtemp()))
    >>> images = np.zeros((2, 4, 4, 3), np.uint8); labels = np.ones((2, 4, 4), np.uint8)
    >>> path = shards.write(0, images, labels, np.array([0.5, 0.1], np.float32))
    >>> shards.done_starts(), shards.read(0)["scores"].tolist()
    ([0], [0.5, 0.10000000149011612])
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bench.errors import BenchError

_NAME = re.compile(r"^(\d{9})-([0-9a-f]{16})\.safetensors$")
FIELDS = ("images", "labels", "scores", "index")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardStore:
    """The ``shards/`` folder of one synthetic set.

    Example:
        >>> import tempfile
        >>> ShardStore(Path(tempfile.mkdtemp())).done_starts()
        []
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.folder = self.root / "shards"
        self.folder.mkdir(parents=True, exist_ok=True)

    def clean_partial(self) -> int:
        """Remove temporary files a killed writer left; returns how many (a finished shard is never touched)."""
        stale = [p for p in self.folder.iterdir() if p.name.startswith(".tmp-")]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def _paths(self) -> dict[int, Path]:
        found: dict[int, Path] = {}
        for p in self.folder.iterdir():
            m = _NAME.match(p.name)
            if m is None:
                continue
            start = int(m.group(1))
            if start in found:
                raise BenchError(f"two shards start at sample {start} in {self.folder} ({found[start].name}, "
                                 f"{p.name}); delete the set folder {self.root} and synthesise it again")
            found[start] = p
        return found

    def done_starts(self) -> list[int]:
        """Start indices of the finished shards, ascending."""
        return sorted(self._paths())

    def path(self, start: int) -> Path:
        """The finished shard starting at ``start`` (error if there is none)."""
        found = self._paths().get(int(start))
        if found is None:
            raise BenchError(f"no shard starts at sample {start} in {self.folder}")
        return found

    def verify(self, start: int) -> None:
        """Check that a shard's bytes match the sha256 in its name (one line naming the file if not)."""
        path = self.path(start)
        digest = _sha256(path)
        if not path.name.endswith(f"-{digest[:16]}.safetensors"):
            raise BenchError(f"shard {path} is corrupt (its sha256 {digest[:16]} does not match its name); "
                             f"delete that file and run again to re-create it")

    def write(self, start: int, images: np.ndarray, labels: np.ndarray, scores: np.ndarray,
              meta: dict[str, Any] | None = None) -> Path:
        """Write samples ``[start, start + n)`` as one shard, atomically; returns its final path.

        Example:
            >>> import tempfile
            >>> s = ShardStore(Path(tempfile.mkdtemp()))
            >>> s.write(5, np.zeros((1, 2, 2, 3), np.uint8), np.zeros((1, 2, 2), np.uint8), np.zeros(1, np.float32)).name[:10]
            '000000005-'
        """
        from safetensors.numpy import save_file

        n = len(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise BenchError(f"shard images must be uint8 [n, H, W, 3], got {images.dtype} {list(images.shape)}")
        if labels.dtype != np.uint8 or labels.shape != images.shape[:3]:
            raise BenchError(f"shard labels must be uint8 {list(images.shape[:3])}, got {labels.dtype} {list(labels.shape)}")
        if scores.shape != (n,):
            raise BenchError(f"shard scores must have shape [{n}], got {list(scores.shape)}")
        if int(start) in self._paths():
            return self.path(start)  # finished before: never rewritten
        tensors = {
            "images": np.ascontiguousarray(images), "labels": np.ascontiguousarray(labels),
            "scores": np.ascontiguousarray(scores, dtype=np.float32),
            "index": np.arange(start, start + n, dtype=np.int64),
        }
        text = json.dumps({"start": int(start), "count": n, **(meta or {})}, sort_keys=True, separators=(",", ":"))
        tmp = self.folder / f".tmp-{start:09d}-{os.getpid()}"
        try:
            save_file(tensors, str(tmp), metadata={"bench": text})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            final = self.folder / f"{start:09d}-{_sha256(tmp)[:16]}.safetensors"
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final

    def read(self, start: int, fields: tuple[str, ...] = FIELDS) -> dict[str, np.ndarray]:
        """The arrays of one shard (only ``fields``)."""
        from safetensors import safe_open

        with safe_open(str(self.path(start)), framework="np") as f:
            return {name: f.get_tensor(name) for name in fields}

    def read_sample(self, start: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, label) of sample ``start + offset`` without reading the rest of its shard."""
        from safetensors import safe_open

        with safe_open(str(self.path(start)), framework="np") as f:
            return f.get_slice("images")[offset], f.get_slice("labels")[offset]

    def iter_scores(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(index, scores) of every finished shard in sample order: all a filter needs."""
        for start in self.done_starts():
            part = self.read(start, ("index", "scores"))
            yield part["index"], part["scores"]
