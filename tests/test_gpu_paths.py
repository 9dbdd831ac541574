"""The CUDA branches: probe training (fp32, bf16, fp16), prediction, pinned non-blocking copies, fp16 extraction.

Tests marked ``needs_cuda`` run only where ``torch.cuda.is_available()``; elsewhere pytest reports them
as skipped with the reason "needs CUDA: no GPU here" (``pytest -rs`` lists them). The device-agnostic
parts of the same code paths (the loaders' copies, the explicit low-precision layer that CUDA uses,
prediction) also run here on the CPU, so a CPU-only CI still exercises them.
"""
from __future__ import annotations

import pytest
import torch

import helpers

from bench.probe import EnsembleMLP, TensorPixelSource, TrainConfig, predict_chunked, train_ensemble
from bench.probe_data import _InlineLoader, _Prefetcher, to_device
from bench.probe_precision import LowPrecisionFirstLayer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU here")


def blobs(n: int = 640, dim: int = 16, classes: int = 3, seed: int = 0):
    return helpers.blobs(n, dim, classes, seed)


# ---- device-agnostic parts, run everywhere --------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefetched_and_inline_batches_are_the_same_pixels_in_the_step_dtype(dtype):
    feats, labels = blobs()
    source = TensorPixelSource(feats.half(), labels)
    perms = torch.stack([torch.randperm(640, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]).int()
    inline = _InlineLoader(source, perms, 64, "cpu", dtype)
    prefetch = _Prefetcher(source, perms, 64, 10, "cpu", dtype)
    try:
        for step in range(3):
            (xa, ya), (xb, yb) = inline.take(step), prefetch.take(step)
            assert xa.dtype == xb.dtype == dtype and xa.shape == (2, 64, 16)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            rows = perms[:, step * 64:(step + 1) * 64].long()
            assert torch.equal(xa.float(), feats.half()[rows].to(dtype).float())  # one rounding, to dtype
            assert torch.equal(ya, labels[rows].reshape(-1))
    finally:
        prefetch.close()


def test_to_device_is_a_plain_copy_on_cpu():
    x, y = torch.randn(4, 3), torch.arange(4)
    xd, yd = to_device(x, y, "cpu", pinned=False)
    assert torch.equal(xd, x) and torch.equal(yd, y)


def test_fp16_layer_runs_on_cpu_the_code_cuda_uses():
    """The fp16 mode is CUDA-only in a run; its layer is device-agnostic and checked here on the CPU."""
    weight = torch.randn(2, 16, 8) * 0.02
    layer = LowPrecisionFirstLayer(weight, torch.float16)
    x = torch.randn(2, 64, 16)
    out = layer.forward(x.half())
    out.sum().backward()
    layer.weight_gradient()
    reference = torch.bmm(x.half().float().transpose(1, 2), torch.ones(2, 64, 8))
    torch.testing.assert_close(layer.grad, reference, rtol=2e-3, atol=1e-3)


# ---- CUDA ------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_probe_trains_on_cuda_like_on_cpu(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("needs a CUDA GPU with bf16")
    feats, labels = blobs(1280)
    config = TrainConfig(members=3, max_epochs=5, precision=precision)
    gpu, gpu_infos = train_ensemble(TensorPixelSource(feats, labels), 3, seeds=[0, 1, 2], config=config,
                                    device="cuda", progress=False)
    cpu_config = TrainConfig(members=3, max_epochs=5, precision="fp32" if precision == "fp16" else precision)
    cpu, _ = train_ensemble(TensorPixelSource(feats, labels), 3, seeds=[0, 1, 2], config=cpu_config, progress=False)
    assert gpu.linear1_weight.device.type == "cuda" and gpu.precision == precision
    assert all(i["final_loss"] < 0.5 for i in gpu_infos)
    gpu_labels, gpu_js = predict_chunked(gpu, lambda s: feats[s], 1280, chunk=500, device="cuda")
    cpu_labels, _ = predict_chunked(cpu, lambda s: feats[s], 1280, chunk=500)
    assert gpu_labels.device.type == "cpu" and gpu_js.dtype == torch.float32
    assert (gpu_labels == labels).float().mean() > 0.95
    assert (gpu_labels == cpu_labels).float().mean() > 0.97


@needs_cuda
def test_prefetcher_pins_and_copies_non_blocking_on_cuda():
    feats, labels = blobs()
    perms = torch.randperm(640).int().view(1, -1)
    loader = _Prefetcher(TensorPixelSource(feats, labels), perms, 64, 10, "cuda", torch.bfloat16)
    try:
        pending_x, pending_y = loader.pending.result()
        assert pending_x.is_pinned() and pending_y.is_pinned() and pending_x.dtype == torch.bfloat16
        x, y = loader.take(0)
        torch.cuda.synchronize()
        assert x.device.type == "cuda" and torch.equal(x.cpu(), feats[perms[0, :64].long()].bfloat16().view(1, 64, -1))
        assert torch.equal(y.cpu(), labels[perms[0, :64].long()])
    finally:
        loader.close()


@needs_cuda
def test_predict_moves_chunks_and_matches_cpu():
    ens = EnsembleMLP(16, 3, members=3, seeds=[0, 1, 2]).eval()
    feats = torch.randn(300, 16)
    cpu = predict_chunked(ens, lambda s: feats[s], 300, chunk=128)
    gpu = predict_chunked(ens, lambda s: feats[s], 300, chunk=128, device="cuda")
    assert (gpu[0] == cpu[0]).float().mean() > 0.99
    torch.testing.assert_close(gpu[1], cpu[1], atol=1e-4, rtol=0)


@needs_cuda
def test_ddpm_fp16_extraction_on_cuda_is_close_to_fp32():
    """The official fp16 numerics (spec §3.6) run on CUDA and stay near the fp32 features."""
    import bench

    cls = bench.get_backbone_class("ddpm")
    kwargs = dict(cls.tiny)
    size = int(kwargs["arch"]["image_size"])
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    fp32 = bench.create_backbone("ddpm", device="cuda", **kwargs)
    fp16 = bench.create_backbone("ddpm", device="cuda", fp16=True, **kwargs)
    maps32, maps16 = fp32.extract(images), fp16.extract(images)
    assert [m.shape for m in maps32] == [m.shape for m in maps16]
    for a, b in zip(maps32, maps16):
        assert a.device.type == "cuda" and b.dtype == torch.float32  # captured fp16, handed on as float32
        scale = a.abs().max().clamp_min(1.0)
        assert (a - b).abs().max() / scale < 0.05


def test_images_stay_put_off_cuda():
    from bench.contract import images_to_device

    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    assert images_to_device(images, "cpu") is images and images_to_device(images, "mps") is images


@needs_cuda
def test_extraction_sends_uint8_images_pinned_and_non_blocking(monkeypatch):
    import bench
    from bench import contract

    sent = []
    original = contract.images_to_device

    def spy(images, device):
        moved = original(images, device)
        sent.append((images.dtype, moved.device.type))
        return moved

    monkeypatch.setattr(contract, "images_to_device", spy)
    backbone = bench.create_backbone("pixels", device="cuda")
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    maps = backbone.extract(images)
    assert sent == [(torch.uint8, "cuda")] and maps[0].device.type == "cuda"
    torch.testing.assert_close(maps[0].cpu(), bench.create_backbone("pixels").extract(images)[0])
