"""Native-resolution feature maps: dense upsampling, the pixel sampler and the on-disk feature store.

The official pipeline upsamples every map to the image size and concatenates them into a
``[N, C, H, W]`` float32 tensor (88.6 GB for Bedroom-28). We keep the maps at their native resolution
(fp16, channels-last, on disk) and compute a pixel's feature vector only when it is needed, by
bilinear sampling of each native map at that pixel. With ``align_corners=False`` this gives exactly
the values of upsample-then-index (``tests/test_features.py`` proves it), so nothing downstream
changes, but memory is bounded by how many pixels are asked for at once.
"""
from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.fingerprint import digest
from bench.probe_data import take_rows


def upsample_concat(maps: Sequence[torch.Tensor], size: int | tuple[int, int]) -> torch.Tensor:
    """Upsample each ``[B, C_i, h_i, w_i]`` map to ``size`` (bilinear, align_corners=False, no
    antialias) and concatenate along channels, in list order: ``[B, sum C_i, H, W]`` float32.

    This is the official "collect features" step, for users who want dense features.

    Example:
        >>> maps = [torch.zeros(1, 2, 4, 4), torch.ones(1, 3, 8, 8)]
        >>> upsample_concat(maps, 8).shape
        torch.Size([1, 5, 8, 8])
    """
    if isinstance(size, int):
        size = (size, size)
    return torch.cat(
        [F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps], dim=1
    )


@functools.lru_cache(maxsize=64)
def _source_table(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbour rows and weight for bilinear upsampling ``in_size -> out_size``, for every output row.

    Same arithmetic as torch's ``upsample_bilinear2d`` with align_corners=False: the source
    coordinate of output pixel ``d`` is ``(d + 0.5) * in/out - 0.5``, clamped at 0. Cached: a run
    asks for the same few (map size, image size) pairs millions of times.
    """
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0.0)
    lo = src.to(torch.int64)
    hi = torch.clamp(lo + 1, max=in_size - 1)
    return lo, hi, src - lo


def sample_maps(maps: Sequence[torch.Tensor], ys: torch.Tensor, xs: torch.Tensor,
                size: int | tuple[int, int]) -> torch.Tensor:
    """Features of pixels ``(ys, xs)`` of a ``size x size`` (or ``(height, width)``) grid from channels-last native maps.

    The grid is the resolution a label is scored at: the model's square input for square images,
    a non-square label's own size otherwise (:mod:`bench.images`); each map is bilinearly
    upsampled to that grid, so its rows and columns scale independently.

    ``maps[i]`` is ``[h_i, w_i, C_i]`` (any float dtype, e.g. an fp16 memmap-backed tensor); the result
    is ``[n, sum C_i]`` float32 and equals ``upsample_concat`` followed by indexing at those pixels
    (up to float rounding: the four neighbours are blended in one weighted sum).

    Example:
        >>> m = torch.arange(4.).reshape(2, 2, 1)
        >>> sample_maps([m], torch.tensor([0, 3]), torch.tensor([0, 3]), 4).flatten().tolist()
        [0.0, 3.0]
    """
    height, width = (size, size) if isinstance(size, int) else size
    ys, xs = ys.long(), xs.long()
    n = len(ys)
    out = torch.empty(n, sum(int(m.shape[-1]) for m in maps), dtype=torch.float32)
    neighbours: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for m in maps:
        h, w, c = (int(s) for s in m.shape)
        if (h, w) not in neighbours:  # maps of one size (e.g. every step's block) share the lookup
            y_lo, y_hi, y_w = (t[ys] for t in _source_table(h, height))
            x_lo, x_hi, x_w = (t[xs] for t in _source_table(w, width))
            rows = torch.cat([y_lo * w + x_lo, y_lo * w + x_hi, y_hi * w + x_lo, y_hi * w + x_hi])
            weights = torch.stack([(1 - y_w) * (1 - x_w), (1 - y_w) * x_w, y_w * (1 - x_w), y_w * x_w])
            neighbours[h, w] = rows, weights.unsqueeze(-1)
        rows, weights = neighbours[h, w]
        # One read of the 4 neighbours' rows ([4n, C]) and one weighted sum: few ops per map, which
        # matters because a training step samples every map of every image in its batch.
        values = take_rows(m.reshape(h * w, c), rows).view(4, n, c).float()
        out[:, offset : offset + c] = (values * weights).sum(0)
        offset += c
    return out


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


#: bump when the store's layout or the meaning of a stored map changes: every old entry is then a miss
STORE_VERSION = 2
CACHE_DTYPES = ("float16", "float32")


class FeatureStore:
    """Native maps of one backbone configuration, cached on disk (fp16 by default), channels-last.

    Layout: ``root/<backbone>/<key>/<image id>/m<i>.npy`` where ``key`` hashes the backbone's
    ``config()`` (name, weights sha256, layers, timesteps, noise seed, the plugin's
    ``feature_version``, ...), the image size, the stored dtype and :data:`STORE_VERSION`, and
    ``config.json`` records it. The runner uses the sha256 of the image file (and the fit rule, part
    of ``config``) as the image id, so an edited image or another folder's file never reads
    another's features. Each image folder is written to a temporary name and renamed, so an
    interrupted extraction leaves no half-written entry and simply resumes.

    Example:
        >>> import tempfile, bench
        >>> bb = bench.create_backbone("pixels")
        >>> store = FeatureStore(tempfile.mkdtemp(), bb.config(), image_size=8)
        >>> store.has("img0")
        False
    """

    def __init__(self, root: str | Path, config: dict, image_size: int, dtype: str = "float16") -> None:
        if dtype not in CACHE_DTYPES:
            raise BenchError(f"feature cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        self.config = {**config, "image_size": image_size, "cache_dtype": dtype, "store_version": STORE_VERSION}
        self.key = digest(self.config, 20)
        self.image_size = image_size
        self.folder = Path(root) / str(config.get("backbone", "backbone")) / self.key
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "config.json"
        if not meta.exists():
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.config, indent=1, sort_keys=True, default=str))
            os.replace(tmp, meta)

    def _image_dir(self, image_id: str) -> Path:
        return self.folder / hashlib.sha1(image_id.encode()).hexdigest()[:24]

    def has(self, image_id: str) -> bool:
        """Whether the maps of ``image_id`` are cached."""
        return (self._image_dir(image_id) / "done").exists()

    def put(self, image_id: str, maps: Sequence[torch.Tensor]) -> None:
        """Store one image's maps (``[C, h, w]`` each) in the store's dtype, channels-last, atomically."""
        final = self._image_dir(image_id)
        tmp = _atomic_dir(final)
        try:
            for i, m in enumerate(maps):
                # cast where the map is (on a GPU: half the bytes to copy back), then to the host
                arr = m.detach().to(self.dtype).to("cpu").permute(1, 2, 0).contiguous().numpy()
                np.save(tmp / f"m{i}.npy", arr)
            (tmp / "done").write_text(image_id)
            if final.exists():  # a concurrent writer finished first: keep theirs
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load(self, image_id: str, *, mmap: bool = False) -> list[torch.Tensor]:
        """The cached maps of ``image_id`` as ``[h, w, C]`` tensors (memory-mapped if ``mmap``)."""
        if mmap:
            return [torch.from_numpy(a) for a in self.map_arrays(image_id)]
        return [torch.from_numpy(np.load(f)) for f in self._files(image_id)]

    def _files(self, image_id: str) -> list[Path]:
        folder = self._image_dir(image_id)
        if not (folder / "done").exists():
            raise BenchError(f"no cached features for image {image_id!r} in {self.folder}")
        return sorted(folder.glob("m*.npy"), key=lambda p: int(p.stem[1:]))

    def map_arrays(self, image_id: str) -> list[np.memmap]:
        """The cached maps of ``image_id`` as memory-mapped ``[h, w, C]`` arrays.

        Copy-on-write mappings ("c"): torch wants writable arrays, and we never write, so no page is
        ever copied; the file on disk cannot be modified through them.
        """
        return [np.load(f, mmap_mode="c") for f in self._files(image_id)]

    def ensure(
        self,
        image_ids: Sequence[str],
        load_images: Callable[[Sequence[str]], torch.Tensor],
        extract: Callable[[torch.Tensor], list[torch.Tensor]],
        *,
        batch_size: int = 4,
        progress: bool = True,
        desc: str = "features",
    ) -> None:
        """Compute and cache the maps of every image not cached yet, ``batch_size`` at a time.

        ``load_images(ids) -> uint8 [B, 3, H, W]``; ``extract(images) -> list of [B, C, h, w]``.
        """
        from bench.progress import progress as progress_bar

        todo = [i for i in dict.fromkeys(image_ids) if not self.has(i)]
        with progress_bar(total=len(todo), desc=desc, unit="img", enabled=progress and bool(todo)) as bar:
            for start in range(0, len(todo), batch_size):
                ids = todo[start : start + batch_size]
                maps = extract(load_images(ids))
                for b, image_id in enumerate(ids):
                    self.put(image_id, [m[b] for m in maps])
                bar.update(len(ids))


@dataclass
class PixelIndex:
    """Which pixels of which images form the training set (the ``[N*H*W]`` index, never the features)."""

    image: torch.Tensor  # int32 [n] position in ``image_ids``
    y: torch.Tensor  # int32 [n]
    x: torch.Tensor  # int32 [n]
    labels: torch.Tensor  # int64 [n]
    shapes: list[tuple[int, int]]  # (height, width) of each image's label grid, the sampling grid


def build_pixel_index(labels: Iterable[np.ndarray], ignore_label: int) -> PixelIndex:
    """Keep every pixel whose (training) label is not ``ignore_label``; all of them, no subsampling.

    Example:
        >>> idx = build_pixel_index([np.array([[0, 255], [1, 1]])], ignore_label=255)
        >>> idx.labels.tolist(), idx.y.tolist(), idx.x.tolist(), idx.shapes
        ([0, 1, 1], [0, 1, 1], [0, 0, 1], [(2, 2)])
    """
    parts, shapes = [], []
    for i, lab in enumerate(labels):
        shapes.append((int(lab.shape[0]), int(lab.shape[1])))
        ys, xs = np.nonzero(lab != ignore_label)
        parts.append((np.full(len(ys), i, dtype=np.int32), ys, xs, lab[ys, xs]))
    if not parts:
        raise BenchError("no training images")
    cat = [np.concatenate(p) for p in zip(*parts)]
    if len(cat[0]) == 0:
        raise BenchError("the training images have no labelled pixels (every pixel is the ignore label)")
    # int32 positions: this index is O(N*H*W), the largest structure left once features stream.
    return PixelIndex(
        image=torch.from_numpy(cat[0]),
        y=torch.from_numpy(cat[1].astype(np.int32)),
        x=torch.from_numpy(cat[2].astype(np.int32)),
        labels=torch.from_numpy(cat[3].astype(np.int64)),
        shapes=shapes,
    )


FAULT_AROUND_BYTES = 64 * 1024


@functools.lru_cache(maxsize=1)
def bytes_per_read() -> int:
    """An upper bound on what one read of a memory-mapped cache file can make resident.

    Linux maps file pages around a fault ("fault-around", 64 KiB); kernels whose page cache keeps
    large folios map a whole folio instead (Linux 6.18 on ext4: a 2 MiB PMD mapping, with or without
    MADV_RANDOM). So the charge is the larger of 64 KiB and the PMD size the kernel reports.

    Example:
        >>> bytes_per_read() >= FAULT_AROUND_BYTES
        True
    """
    try:
        pmd = int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text().strip())
    except (OSError, ValueError):
        pmd = 0
    return max(FAULT_AROUND_BYTES, pmd)


class StreamedPixels:
    """A probe ``PixelSource`` that samples pixel features from the cached native maps on demand.

    Nothing of size ``[N*H*W, C]`` exists: a batch of pixel indices is grouped by image and each
    group is bilinearly sampled from that image's memory-mapped fp16 maps. Once the pages touched
    since the last reset could exceed ``max_resident_bytes``, the maps are re-mapped so that those
    pages leave the process's resident set (the OS page cache keeps them warm, so nothing is re-read
    from disk): resident memory stays bounded by that setting, whatever the number of images.

    Example:
        >>> # see tests/test_features.py::test_streamed_pixels_equal_dense_upsample
    """

    #: tells the trainer that gathering is real work worth a core of its own (see probe.train_ensemble)
    gather_is_costly = True

    def __init__(self, store: FeatureStore, image_ids: Sequence[str], index: PixelIndex, *,
                 max_resident_bytes: int = 1 << 30) -> None:
        self.store, self.image_ids, self.index = store, list(image_ids), index
        self.labels = index.labels
        self.num_pixels = len(index.labels)
        self.max_resident_bytes = max_resident_bytes
        self._maps: dict[int, list[torch.Tensor]] = {}
        self._arrays: list[np.memmap] = []
        self._touched = 0  # upper bound on the bytes of mapped pages touched since the last reset
        first = store.load(self.image_ids[0], mmap=True)
        self.dim = sum(int(m.shape[-1]) for m in first)
        # What one read of a map position can make resident (bytes_per_read: fault-around or a whole
        # large folio), capped by the size of the whole map.
        self._read_bytes = [max(bytes_per_read(), int(m.shape[-1]) * m.element_size()) for m in first]
        self._map_bytes = [m.numel() * m.element_size() for m in first]

    def _image_maps(self, i: int) -> list[torch.Tensor]:
        if i not in self._maps:
            arrays = self.store.map_arrays(self.image_ids[i])
            self._arrays.extend(arrays)
            self._maps[i] = [torch.from_numpy(a) for a in arrays]
        return self._maps[i]

    def _release_pages(self) -> None:
        """Drop every mapped page from the resident set; the mappings stay open (re-opening 15 maps
        per image would cost more than the sampling) and the page cache keeps the data warm."""
        for array in self._arrays:
            handle = getattr(array, "_mmap", None)
            if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                handle.madvise(mmap.MADV_DONTNEED)
            else:  # no madvise on this platform: close the mappings instead
                self._maps.clear()
                self._arrays.clear()
                return

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """int64 ``[n]`` pixel indices -> float32 ``[n, dim]`` features."""
        img = self.index.image[index]
        out = torch.empty(len(index), self.dim, dtype=torch.float32)
        order = torch.argsort(img, stable=True)
        sorted_img = img[order]
        uniq, counts = torch.unique_consecutive(sorted_img, return_counts=True)
        start = 0
        for i, n in zip(uniq.tolist(), counts.tolist()):
            # 4 neighbours per pixel, at most the whole map
            touch = sum(min(4 * n * r, total) for r, total in zip(self._read_bytes, self._map_bytes))
            if self._touched + touch > self.max_resident_bytes:
                self._release_pages()
                self._touched = 0
            self._touched += touch
            rows = order[start : start + n]
            pix = index[rows]
            out[rows] = sample_maps(self._image_maps(i), self.index.y[pix], self.index.x[pix], self.index.shapes[i])
            start += n
        return out


class DensePixels:
    """A probe ``PixelSource`` holding the kept training pixels' features in RAM (float32).

    Used only when ``dense_bytes(num_pixels, dim)`` fits the memory budget: then every gather is one
    index operation, much faster than sampling the native maps. The rows are computed by the same
    sampler from the same fp16 maps, so both sources feed the probe bit-identical features.

    Example:
        >>> # see tests/test_features.py::test_dense_and_streamed_sources_agree
    """

    def __init__(self, store: FeatureStore, image_ids: Sequence[str], index: PixelIndex) -> None:
        self.labels = index.labels
        self.num_pixels = len(index.labels)
        first = store.load(image_ids[0])
        self.dim = sum(int(m.shape[-1]) for m in first)
        self._feats = torch.empty(self.num_pixels, self.dim, dtype=torch.float32)
        order = torch.argsort(index.image, stable=True)
        counts = torch.bincount(index.image.long(), minlength=len(image_ids)).tolist()
        start = 0
        for i, n in enumerate(counts):
            if n:
                rows = order[start : start + n]
                self._feats[rows] = sample_maps(store.load(image_ids[i]), index.y[rows], index.x[rows], index.shapes[i])
            start += n

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """int64 ``[n]`` pixel indices -> float32 ``[n, dim]`` features."""
        return take_rows(self._feats, index)  # same rows as ``[index]``, ~4x faster at 864 features


def dense_bytes(num_pixels: int, dim: int) -> int:
    """Bytes :class:`DensePixels` needs (float32 rows).

    Example:
        >>> dense_bytes(10, 4)
        160
    """
    return num_pixels * dim * 4
