"""The resident-memory bound of ``bench.features.StreamedPixels``, measured from the kernel's own numbers.

``StreamedPixels`` promises that the pages of the memory-mapped feature cache resident in the process stay
below ``max_resident_bytes``: it counts an upper bound of the bytes each gather can fault in (4 neighbour
reads per pixel and map, each up to one 64 KiB fault-around window, capped by the map's size) and
drops every mapped page (``madvise(MADV_DONTNEED)``) before that count would pass the cap. Here a
~220 MB cache is sampled the way the probe samples it, and after every gather the ``Rss`` of the
mappings of the cache files is read from ``/proc/self/smaps``. The control run without a cap shows the
same gathers do make far more than the cap resident, so the bound is the class's doing.

The per-read charge is the weak point: kernels that keep file pages in large folios map a whole folio
per fault (Linux 6.18 on ext4: 2 MiB, ``FilePmdMapped``), not one 64 KiB window. With the probe's
640-pixel gathers most maps are charged in full anyway, but sparse gathers overshot the cap (42 MiB
for 32 MiB) while the class charged 64 KiB per read; it now charges ``bytes_per_read()``, and the
sparse test checks that this is at least what the kernel maps.
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.features import FeatureStore, StreamedPixels, build_pixel_index, bytes_per_read

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/smaps and relies on madvise(MADV_DONTNEED): Linux only")

MiB = 1 << 20
CAP = 32 * MiB
# Slack over the cap: 16 fault-around windows (64 KiB each). The class already charges a full window per
# read, which is generous (neighbouring reads share windows); the slack only absorbs a read that
# straddles two windows (a 512-byte row across a 64 KiB boundary), which the count does not foresee.
SLACK = 16 * 64 * 1024
IMAGE_SIZE = 128
# (channels, native size) of each map, DDPM-like: 128 KiB, 512 KiB, 1 MiB and 2 MiB per image in fp16.
MAPS = [(256, 16), (256, 32), (128, 64), (64, 128)]
IMAGES = 60  # 60 x 3.6 MiB = 217.5 MiB of cache files
# The probe asks for 10 members x 64 pixels per step: ~11 pixels per image here, so the class charges
# most maps of a touched image in full (4 x 8 x 64 KiB reach the 2 MiB map's size), whatever the kernel
# maps per read. The readings after a gather land anywhere in the cycle (~7 releases per gather).
PROBE_BATCH = [640]
# Sparse gathers (1-2 pixels per image) are where the per-read charge matters; their per-gather count
# (~14 MiB at 16 pixels) is below the cap, so the readings land at every phase between two releases.
SPARSE_BATCHES = [16, 64, 16, 16]


def mapped_rss(folder: Path) -> int:
    """Resident bytes of this process's mappings of files under ``folder`` (sum of smaps ``Rss``)."""
    prefix = str(folder.resolve()) + "/"
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        text = f.read()  # one read: the kernel walks every mapping once
    for line in text.splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping header: "start-end perms offset dev inode path"
            fields = line.split(None, 5)
            inside = len(fields) == 6 and fields[5].startswith(prefix)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024  # "Rss:   1234 kB"
    return total


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A feature cache of ~220 MB: random fp16 maps from a synthetic extractor, every pixel labelled."""
    root = tmp_path_factory.mktemp("residency")
    store = FeatureStore(root / "cache", {"backbone": "synthetic-residency"}, image_size=IMAGE_SIZE)
    g = torch.Generator().manual_seed(0)
    # One random map per block, shifted per image: random-looking data, created in ~1 s.
    bases = [torch.randn(c, h, h, generator=g).half() for c, h in MAPS]
    ids = [f"img{i:03d}" for i in range(IMAGES)]

    def load_images(batch_ids):
        return torch.tensor([int(i[3:]) for i in batch_ids])  # stands in for the images: their number

    def extract(numbers):
        return [torch.stack([base + 0.01 * n for n in numbers.tolist()]) for base in bases]

    store.ensure(ids, load_images, extract, batch_size=6, progress=False)
    files = list(store.folder.rglob("*.npy"))
    assert len(files) == IMAGES * len(MAPS)
    assert sum(f.stat().st_size for f in files) > 200 * MiB
    index = build_pixel_index([np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.int64)] * IMAGES, ignore_label=255)
    yield store, ids, index
    shutil.rmtree(root, ignore_errors=True)  # do not leave 220 MB in pytest's kept temp folders


def bytes_mapped_by_one_read(folder: Path) -> int:
    """How much of a fresh 4 MiB ``np.save`` file one 8-byte read through ``np.load(mmap_mode="c")`` makes resident.

    The class assumes at most one fault-around window (64 KiB). Kernels whose page cache holds large
    folios may map a whole folio per fault instead: Linux 6.18 on ext4 maps 2 MiB (``FilePmdMapped``),
    with or without MADV_RANDOM / MADV_NOHUGEPAGE.
    """
    path = folder / "probe_fault_size.npy"
    np.save(path, np.arange(512 * 1024, dtype=np.float64))
    array = np.load(path, mmap_mode="c")
    before = mapped_rss(folder)
    float(array[320 * 1024])  # 2.5 MiB into the data
    grown = mapped_rss(folder) - before
    del array
    path.unlink()
    return grown


def _gather_and_measure(source: StreamedPixels, folder: Path, gathers: int, sizes: list[int]) -> list[int]:
    g = torch.Generator().manual_seed(1)
    readings = []
    for i in range(gathers):
        index = torch.randint(0, source.num_pixels, (sizes[i % len(sizes)],), generator=g)
        feats = source.gather(index)
        assert feats.shape == (len(index), sum(c for c, _ in MAPS))
        readings.append(mapped_rss(folder))
    return readings


def _assert_below_cap(readings: list[int]) -> None:
    peak = max(readings)
    assert peak <= CAP + SLACK, (f"mapped RSS {peak / MiB:.1f} MiB over the {CAP / MiB:.0f} MiB cap (+ "
                                 f"{SLACK / MiB:.0f} MiB slack); readings in MiB: "
                                 f"{[round(r / MiB, 1) for r in readings]}")
    # Not trivially small either: the mapped pages do build up towards the cap between releases.
    assert peak > CAP // 4, f"mapped RSS never above {peak / MiB:.1f} MiB"


def test_resident_pages_stay_below_the_cap_with_probe_batches(big_store):
    store, ids, index = big_store
    source = StreamedPixels(store, ids, index, max_resident_bytes=CAP)
    _assert_below_cap(_gather_and_measure(source, store.folder, gathers=15, sizes=PROBE_BATCH))


def test_resident_pages_stay_below_the_cap_with_sparse_gathers(big_store, tmp_path):
    store, ids, index = big_store
    # The class must charge at least what this kernel maps per read (64 KiB fault-around, or a whole
    # large folio: 2 MiB on Linux 6.18/ext4), or sparse reads overshoot the cap.
    assert bytes_per_read() >= bytes_mapped_by_one_read(tmp_path)
    source = StreamedPixels(store, ids, index, max_resident_bytes=CAP)
    _assert_below_cap(_gather_and_measure(source, store.folder, gathers=40, sizes=SPARSE_BATCHES))


def test_control_without_cap_resident_pages_grow_far_past_it(big_store):
    store, ids, index = big_store
    source = StreamedPixels(store, ids, index, max_resident_bytes=1 << 50)
    readings = _gather_and_measure(source, store.folder, gathers=3, sizes=PROBE_BATCH)
    # One 640-pixel gather alone touches most of the 217.5 MiB: without the releases, far over the cap.
    assert max(readings) > 4 * CAP, f"control run: mapped RSS only {max(readings) / MiB:.1f} MiB"
