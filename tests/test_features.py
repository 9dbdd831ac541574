"""Pixel sampler == full upsample, the feature store, and the two pixel sources."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.features import (
    DensePixels, FeatureStore, StreamedPixels, build_pixel_index, sample_maps, upsample_concat,
)


def _maps(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    # native sizes as in the paper's blocks (strides 8, 8, 4, 2 at 64 px) and one full-res map
    return [torch.randn(batch, c, h, h, generator=g) for c, h in [(5, 8), (3, 8), (4, 16), (2, 32), (1, 64)]]


def test_upsample_concat_is_bilinear_align_corners_false_in_list_order():
    maps = _maps()
    dense = upsample_concat(maps, 64)
    assert dense.shape == (2, 15, 64, 64)
    ref = torch.cat([F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False) for m in maps], 1)
    assert torch.equal(dense, ref)
    wrong = torch.cat([F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=True) for m in maps], 1)
    assert (dense - wrong).abs().max() > 1e-2


@pytest.mark.parametrize("size", [64, 48])
def test_sampler_equals_upsample_then_index(size):
    maps = _maps()
    dense = upsample_concat(maps, size)[1]  # [C, H, W] of image 1
    g = torch.Generator().manual_seed(1)
    ys = torch.randint(0, size, (500,), generator=g)
    xs = torch.randint(0, size, (500,), generator=g)
    # corners and edges, where clamping happens
    ys = torch.cat([ys, torch.tensor([0, 0, size - 1, size - 1])])
    xs = torch.cat([xs, torch.tensor([0, size - 1, 0, size - 1])])
    channels_last = [m[1].permute(1, 2, 0) for m in maps]
    sampled = sample_maps(channels_last, ys, xs, size)
    assert sampled.shape == (504, 15)
    torch.testing.assert_close(sampled, dense[:, ys, xs].T, rtol=0, atol=1e-5)  # float rounding of a different op order


def test_sampler_reads_fp16_maps():
    maps = [m.half() for m in _maps(batch=1)]
    channels_last = [m[0].permute(1, 2, 0) for m in maps]
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    sampled = sample_maps(channels_last, ys.flatten(), xs.flatten(), 64)
    dense = upsample_concat([m.float() for m in maps], 64)[0].reshape(15, -1).T
    torch.testing.assert_close(sampled, dense, rtol=0, atol=1e-5)  # float rounding of a different op order


def _filled_store(tmp_path, n_images=3):
    store = FeatureStore(tmp_path / "cache", {"backbone": "unit", "x": 1}, image_size=64)
    originals = {}
    for i in range(n_images):
        maps = _maps(batch=1, seed=10 + i)
        store.put(f"img{i}", [m[0] for m in maps])
        originals[f"img{i}"] = maps
    return store, originals


def test_store_roundtrip_is_fp16_channels_last_and_keyed_by_config(tmp_path):
    store, originals = _filled_store(tmp_path)
    loaded = store.load("img1")
    assert [tuple(m.shape) for m in loaded] == [(8, 8, 5), (8, 8, 3), (16, 16, 4), (32, 32, 2), (64, 64, 1)]
    assert all(m.dtype == torch.float16 for m in loaded)
    torch.testing.assert_close(loaded[2].float(), originals["img1"][2][0].permute(1, 2, 0).half().float())
    other = FeatureStore(tmp_path / "cache", {"backbone": "unit", "x": 2}, image_size=64)
    assert other.key != store.key and not other.has("img1")
    same = FeatureStore(tmp_path / "cache", {"x": 1, "backbone": "unit"}, image_size=64)
    assert same.key == store.key and same.has("img1")


def test_store_ensure_skips_cached_and_leaves_nothing_half_written(tmp_path):
    store = FeatureStore(tmp_path / "cache", {"backbone": "unit"}, image_size=8)
    calls = []

    def load(ids):
        calls.append(list(ids))
        return torch.zeros(len(ids), 3, 8, 8, dtype=torch.uint8)

    def extract_then_fail(images):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of the second batch
        return [torch.ones(images.shape[0], 2, 4, 4)]

    with pytest.raises(KeyboardInterrupt):
        store.ensure(["a", "b", "c"], load, extract_then_fail, batch_size=2, progress=False)
    assert store.has("a") and store.has("b") and not store.has("c")
    assert not [p for p in store.folder.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    calls.clear()
    store.ensure(["a", "b", "c"], load, lambda im: [torch.ones(im.shape[0], 2, 4, 4)], batch_size=2, progress=False)
    assert calls == [["c"]]


def test_streamed_pixels_equal_dense_upsample(tmp_path):
    store, originals = _filled_store(tmp_path)
    g = torch.Generator().manual_seed(0)
    labels = [np.where(np.random.default_rng(i).random((64, 64)) < 0.3, 255, i) for i in range(3)]
    index = build_pixel_index(labels, ignore_label=255)
    assert len(index.labels) == sum(int((lab != 255).sum()) for lab in labels)
    ids = ["img0", "img1", "img2"]
    source = StreamedPixels(store, ids, index, max_resident_bytes=200_000)
    assert source.dim == 15
    pick = torch.randint(0, source.num_pixels, (300,), generator=g)
    got = source.gather(pick)
    for k in range(3):  # several calls exercise the re-mapping at the residency bound
        got = source.gather(pick)
    dense = [upsample_concat([m.half().float() for m in originals[i]], 64)[0] for i in ids]
    want = torch.stack([dense[int(index.image[p])][:, index.y[p], index.x[p]] for p in pick.tolist()])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # float rounding of a different op order
    assert torch.equal(source.labels[pick], index.labels[pick])


def test_dense_and_streamed_sources_agree(tmp_path):
    store, _ = _filled_store(tmp_path)
    labels = [np.full((64, 64), i) for i in range(3)]
    index = build_pixel_index(labels, ignore_label=255)
    ids = ["img0", "img1", "img2"]
    pick = torch.randperm(len(index.labels))[:1000]
    assert torch.equal(DensePixels(store, ids, index).gather(pick), StreamedPixels(store, ids, index).gather(pick))


def test_pixel_index_rejects_all_ignore():
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="no labelled pixels"):
        build_pixel_index([np.full((4, 4), 255)], ignore_label=255)
