"""DDPM pretraining: the hybrid objective, training, EMA output, atomic checkpoints and exact resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from backbones._adm_unet import ADMFlags, ADMUNet
from backbones._ddpm_train import DiffusionLoss, _draw_batch, discretized_gaussian_log_likelihood, pretrain_ddpm
from backbones._diffusion import alphas_cumprod, make_betas, q_sample
from bench.errors import BenchError, CheckpointError




def tiny_flags(**overrides) -> ADMFlags:
    # 32 channels is the smallest width: every ADM layer uses GroupNorm with 32 groups
    base = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,1,1,1",
                attention_resolutions="4", learn_sigma=True)
    return ADMFlags(**{**base, **overrides})


def flat_images(n: int = 3, size: int = 16) -> list[np.ndarray]:
    # a trivial dataset: flat grey images with a small per-image offset
    return [np.full((size, size, 3), 90 + 10 * i, np.uint8) for i in range(n)]


def saved_losses(out_dir: Path) -> torch.Tensor:
    return torch.load(out_dir / "train_state.pt", map_location="cpu", weights_only=True)["losses"]


# ---- the objective -------------------------------------------------------------------------------

def test_q_sample_matches_the_feature_extractor_numerics():
    loss_fn = DiffusionLoss(tiny_flags())
    x0, noise = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 150, 999])
    ab = alphas_cumprod(make_betas("linear", 1000))
    mine = loss_fn.q_sample(x0, t, noise)
    for i, step in enumerate(t.tolist()):
        assert torch.equal(mine[i], q_sample(x0[i:i + 1], step, noise[i:i + 1], ab)[0])


def test_hybrid_loss_weights_vlb_by_steps_over_1000_and_stops_the_mean_gradient():
    loss_fn = DiffusionLoss(tiny_flags(diffusion_steps=2000))
    x0, noise = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 1, 700, 1999])
    x_t = loss_fn.q_sample(x0, t, noise)
    out = (0.3 * torch.randn(4, 6, 4, 4)).requires_grad_()
    terms = loss_fn(out, x0, x_t, t, noise)
    assert torch.allclose(terms["loss"], terms["mse"] + 2.0 * terms["vb"])
    assert torch.all(terms["vb"] > 0)
    (grad,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert torch.all(grad[:, :3] == 0)  # eps only learns from L_simple
    assert grad[:, 3:].abs().sum() > 0  # the variance learns from L_vlb


def test_plain_loss_is_mse_only_without_learn_sigma():
    loss_fn = DiffusionLoss(tiny_flags(learn_sigma=False))
    x0, noise, t = torch.zeros(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 500])
    terms = loss_fn(torch.zeros(2, 3, 4, 4), x0, loss_fn.q_sample(x0, t, noise), t, noise)
    assert torch.allclose(terms["loss"], noise.pow(2).mean(dim=(1, 2, 3)))


def test_kl_vanishes_for_the_true_posterior_and_grows_with_a_wrong_mean():
    loss_fn = DiffusionLoss(tiny_flags())
    x0, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 600])
    x_t = loss_fn.q_sample(x0, t, noise)
    at_posterior = -torch.ones_like(x0)  # v = -1 selects the posterior variance
    assert torch.all(loss_fn.vlb_bits(noise, at_posterior, x0, x_t, t).abs() < 1e-3)
    assert torch.all(loss_fn.vlb_bits(noise + 0.5, at_posterior, x0, x_t, t) > 1e-3)


def test_decoder_nll_integrates_the_gaussian_over_pixel_bins():
    x = torch.tensor([-1.0, 0.0, 1.0])
    mean, sigma = torch.tensor([-0.99, 0.01, 0.98]), 0.02
    log_p = discretized_gaussian_log_likelihood(x, mean, torch.full((3,), math.log(sigma)))
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    expected = [phi((-1 + 1 / 255 + 0.99) / sigma),                           # left edge bin: (-inf, -1+1/255]
                phi((1 / 255 - 0.01) / sigma) - phi((-1 / 255 - 0.01) / sigma),  # interior bin
                1 - phi((1 - 1 / 255 - 0.98) / sigma)]                          # right edge bin: [1-1/255, inf)
    assert torch.allclose(log_p.exp(), torch.tensor(expected), atol=1e-6)


def test_decoder_at_t0_uses_the_clipped_posterior_variance():
    # at t=0 the posterior variance is 0; the decoder uses the t=1 value (v = -1 selects that bound)
    betas = make_betas("linear", 1000)
    ab = alphas_cumprod(betas)
    sigma = math.sqrt(betas[1] * (1 - ab[0]) / (1 - ab[1]))
    loss_fn = DiffusionLoss(tiny_flags())
    x0, noise, t = torch.zeros(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.tensor([0])
    bits = loss_fn.vlb_bits(noise, -torch.ones_like(x0), x0, loss_fn.q_sample(x0, t, noise), t)
    expected = -math.log2(math.erf(1 / 255 / sigma / math.sqrt(2)))  # mass of the pixel's bin around the mean
    assert abs(bits.item() - expected) < 1e-3


# ---- training ------------------------------------------------------------------------------------

@pytest.mark.parametrize("learn_sigma", [True, False], ids=["hybrid", "simple"])
def test_tiny_model_trains_with_finite_loss(tmp_path, learn_sigma):
    path = pretrain_ddpm(flat_images(), tmp_path, flags=tiny_flags(learn_sigma=learn_sigma), steps=30,
                         batch_size=4, lr=1e-3, progress=False)
    assert path == tmp_path / "model_ema.safetensors" and path.exists()
    losses = saved_losses(tmp_path)
    assert losses.shape == (30,) and torch.isfinite(losses).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_ema.safetensors", "train_state.pt"]  # no temp left


def test_batches_are_scaled_to_unit_range_and_randomly_mirrored():
    ramp = np.repeat(np.linspace(0, 255, 16).round().astype(np.uint8)[None, :, None], 16, 0).repeat(3, 2)
    x = torch.from_numpy(ramp).permute(2, 0, 1).float() / 127.5 - 1
    batch = _draw_batch([ramp], 64, torch.Generator().manual_seed(0), 16, random_flip=True)
    assert batch.shape == (64, 3, 16, 16) and batch.min() == -1 and batch.max() == 1
    mirrored = torch.tensor([torch.equal(b, x.flip(2)) for b in batch])
    assert all(torch.equal(b, x) or m for b, m in zip(batch, mirrored)) and 0 < mirrored.sum() < 64
    unflipped = _draw_batch([ramp], 8, torch.Generator().manual_seed(0), 16, random_flip=False)
    assert all(torch.equal(b, x) for b in unflipped)


def test_loss_decreases_on_a_trivial_dataset(tmp_path):
    pretrain_ddpm(flat_images(), tmp_path, flags=tiny_flags(learn_sigma=False), steps=30, batch_size=4,
                  lr=1e-3, seed=1, progress=False)
    losses = saved_losses(tmp_path)
    assert losses[-10:].mean() < 0.6 * losses[:10].mean()


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    # dropout and random flips on: every random draw must come from the checkpointed generator
    flags = tiny_flags(dropout=0.1)
    kwargs = dict(flags=flags, batch_size=3, lr=1e-3, ema_rate=0.99, seed=7, save_every=3, progress=False)
    global_rng = torch.get_rng_state()
    straight = pretrain_ddpm(flat_images(), tmp_path / "straight", steps=6, **kwargs)
    pretrain_ddpm(flat_images(), tmp_path / "split", steps=3, **kwargs)
    assert saved_losses(tmp_path / "split").shape == (3,)
    lines: list[str] = []
    resumed = pretrain_ddpm(flat_images(), tmp_path / "split", steps=6, log=lines.append, **kwargs)
    assert any("resuming from step 3" in line for line in lines)
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(saved_losses(tmp_path / "straight"), saved_losses(tmp_path / "split"))
    assert torch.equal(torch.get_rng_state(), global_rng)  # the global RNG was neither used nor reseeded


def test_ema_safetensors_has_official_keys_and_arch_metadata(tmp_path, capsys):
    flags = tiny_flags()
    path = pretrain_ddpm(flat_images(), tmp_path, flags=flags, steps=4, batch_size=2, lr=1e-3)
    progress_bar = capsys.readouterr().err
    assert "4/4" in progress_bar and "loss=" in progress_bar
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["bench_arch"]) == flags.to_dict() and metadata["steps"] == "4"
    ema = load_file(path)
    reference = ADMUNet(flags).state_dict()
    assert set(ema) == set(reference)
    assert all(ema[k].dtype == torch.float32 and ema[k].shape == reference[k].shape for k in ema)
    state = torch.load(tmp_path / "train_state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4 and ADMFlags.from_dict(state["flags"]) == flags
    # the EMA is an average, not a copy of the trained weights
    assert any(not torch.equal(ema[k], state["model"][k]) for k in ema)
    ADMUNet(flags).load_state_dict(ema, strict=True)


# ---- errors --------------------------------------------------------------------------------------

def test_wrong_image_size_names_index_and_sizes(tmp_path):
    images = flat_images(1) + [np.zeros((24, 24, 3), np.uint8)]
    with pytest.raises(BenchError, match=r"index 1 .*24x24x3.*16x16x3"):
        pretrain_ddpm(images, tmp_path, flags=tiny_flags(), steps=2, batch_size=8, progress=False)
    assert not (tmp_path / "train_state.pt").exists()


def test_resume_with_changed_flags_names_the_flag(tmp_path):
    pretrain_ddpm(flat_images(), tmp_path, flags=tiny_flags(), steps=1, batch_size=2, progress=False)
    before = (tmp_path / "train_state.pt").read_bytes()
    with pytest.raises(BenchError, match="num_res_blocks=1 but num_res_blocks=2"):
        pretrain_ddpm(flat_images(), tmp_path, flags=tiny_flags(num_res_blocks=2), steps=2, batch_size=2,
                      progress=False)
    assert (tmp_path / "train_state.pt").read_bytes() == before


def test_class_conditional_pretraining_is_rejected(tmp_path):
    with pytest.raises(BenchError, match="class_cond"):
        pretrain_ddpm(flat_images(), tmp_path, flags=tiny_flags(class_cond=True), steps=1, progress=False)


def test_schedule_with_betas_above_one_is_rejected():
    # linear betas are scaled by 1000/steps: 10 steps would give beta = 2
    with pytest.raises(BenchError, match="diffusion_steps=10"):
        DiffusionLoss(tiny_flags(diffusion_steps=10))


def test_unreadable_train_state_names_the_file(tmp_path):
    (tmp_path / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="train_state.pt"):
        pretrain_ddpm(flat_images(), tmp_path, flags=tiny_flags(), steps=1, progress=False)
