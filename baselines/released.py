"""The official released synthetic sets (50,000 samples each) as our shard sets, streamed.

``synthetic-datasets/{ddpm,gan}/<dataset>.tar.gz`` holds ``samples_256x256x3.npz``: positional arrays
images uint8 [N, 256, 256, 3], labels uint8 [N, 256, 256], then scores float32 [N] (DDPM) or
latents and scores (GAN) (baselines spec §3.5). The set is 13.1 GB in RAM, so it is never loaded:
each ``.npy`` member of the zip is read as a stream (header, then ``shard_size`` rows at a time) into
content-addressed shards (:mod:`baselines.shards`), which the consumers read lazily. Object arrays
are refused (``allow_pickle=False``), archives go through :func:`bench.archives.safe_extract`.

Example:
    >>> # s = import_released(Path("cat_15.tar.gz"), "datasetddpm", "cat15"); s.num
    >>> # 50000
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from baselines.shards import ShardStore
from baselines.synth import SYNTH_VERSION, SynthSet, _write_json_once
from bench.errors import BenchError
from bench.fingerprint import digest


def _npy_header(stream: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` stream positioned at its start; refuses pickled and Fortran arrays."""
    from numpy.lib import format as npy

    version = npy.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = npy.read_array_header_1_0(stream)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = npy.read_array_header_2_0(stream)
    else:  # pragma: no cover - numpy raises on unknown versions itself
        raise BenchError(f"{where}: unsupported .npy version {version}")
    if dtype.hasobject:
        raise BenchError(f"{where}: holds Python objects (a pickle); refused, released sets hold plain arrays")
    if fortran and len(shape) > 1:
        raise BenchError(f"{where}: Fortran-ordered array, not the released layout")
    return tuple(int(s) for s in shape), dtype


class _Rows:
    """Rows of one ``.npy`` member of a zip, read ``n`` at a time (memory: one chunk)."""

    def __init__(self, archive: zipfile.ZipFile, name: str, where: str) -> None:
        self.stream = archive.open(name)
        self.shape, self.dtype = _npy_header(self.stream, f"{where}:{name}")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.where = f"{where}:{name}"

    def read(self, n: int) -> np.ndarray:
        data = self.stream.read(n * self.row_bytes)
        if len(data) != n * self.row_bytes:
            raise BenchError(f"{self.where}: truncated (expected {n * self.row_bytes} more bytes)")
        return np.frombuffer(data, dtype=self.dtype).reshape(n, *self.shape[1:])


def _find_npz(path: Path, work: Path) -> Path:
    if path.suffix == ".npz":
        return path
    from bench.archives import safe_extract

    folder = work / "extracted"
    if not folder.exists():
        safe_extract(path, folder)
    found = sorted(folder.rglob("*.npz"))
    if len(found) != 1:
        raise BenchError(f"{path}: expected one .npz inside, found {len(found)}")
    return found[0]


def import_released(path: Path, method: str, dataset: str, *, shard_size: int = 100, root: Path | None = None,
                    progress: bool = True) -> SynthSet:
    """Convert a released ``.npz`` (or the ``.tar.gz`` holding it) into a shard set; resumable, idempotent.

    Example:
        >>> import_released(Path("missing.npz"), "datasetddpm", "demo")
        Traceback (most recent call last):
        bench.errors.BenchError: released set missing.npz: no such file
    """
    from bench.cards import get_card
    from bench.hub import cache_dir, sha256_file
    from bench.progress import progress as progress_bar

    path = Path(path)
    if not path.is_file():
        raise BenchError(f"released set {path}: no such file")
    card = get_card(dataset)
    sha = sha256_file(path)
    identity = {"version": SYNTH_VERSION, "method": method, "dataset": card.name, "seed": None,
                "source": {"released": path.name, "sha256": sha}, "shard_size": shard_size,
                "num_classes": card.num_classes}
    key = digest(identity, 20)
    folder = (Path(root) if root else cache_dir("synth")) / f"{method}-{card.name}-released-{key}"
    shards = ShardStore(folder)
    _write_json_once(folder / "set.json", identity)
    shards.clean_partial()
    npz = _find_npz(path, folder)
    with zipfile.ZipFile(npz) as archive:
        names = sorted((n for n in archive.namelist() if n.endswith(".npy")),
                       key=lambda n: int(n[4:-4]) if n.startswith("arr_") and n[4:-4].isdigit() else 1 << 30)
        if len(names) < 3:
            raise BenchError(f"{npz}: expected images, labels and scores arrays, found {names}")
        images, labels, scores = (_Rows(archive, n, str(npz)) for n in (names[0], names[1], names[-1]))
        count = images.shape[0]
        if images.dtype != np.uint8 or len(images.shape) != 4 or images.shape[-1] != 3:
            raise BenchError(f"{npz}: images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
        if labels.shape != images.shape[:3] or scores.shape != (count,):
            raise BenchError(f"{npz}: labels {list(labels.shape)} / scores {list(scores.shape)} do not match "
                             f"images {list(images.shape)}")
        identity["image_size"] = images.shape[1]
        done = set(shards.done_starts())
        with progress_bar(total=count, desc="released set", unit="img", enabled=progress) as bar:
            for start in range(0, count, shard_size):
                n = min(shard_size, count - start)
                parts = images.read(n), labels.read(n), scores.read(n).astype(np.float32)
                if start not in done:
                    if int(parts[1].max(initial=0)) >= card.num_classes:
                        raise BenchError(f"{npz}: label id {int(parts[1].max())} in samples {start}..{start + n - 1} "
                                         f"is not a class of {card.name}")
                    shards.write(start, parts[0], parts[1], parts[2], meta={"set": key})
                bar.update(n)
    return SynthSet(folder, key, count, shard_size, identity, "released", {"method": method, "released": str(path)})
