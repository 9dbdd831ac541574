"""Reverse sampling (DDPM ancestral, DDIM, respacing) against the equations, with an oracle model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backbones._adm_unet import ADMFlags, ADMUNet
from backbones._diffusion import alphas_cumprod, make_betas
from backbones._diffusion_sampling import (SamplerConfig, Schedule, _step, respaced_timesteps, sample_images,
                                           sampler_kind_from_flag)
from bench.errors import BenchError

FLAGS = ADMFlags(image_size=8, num_channels=32, channel_mult="1,1", attention_resolutions="", learn_sigma=True,
                 diffusion_steps=1000)


class Oracle(torch.nn.Module):
    """Knows the target x0: returns the exact eps of x_t at the ORIGINAL timestep it is given."""

    def __init__(self, x0: torch.Tensor, use_index_of: list[int] | None = None) -> None:
        super().__init__()
        self.x0 = x0
        self.ab = alphas_cumprod(make_betas("linear", 1000))
        self.remap = {t: i for i, t in enumerate(use_index_of)} if use_index_of else None  # the planted bug

    def forward(self, x, t):
        tt = int(t[0])
        if self.remap is not None:
            tt = self.remap[tt]  # pretend the model was handed the respaced index i instead of t_i
        ab = float(self.ab[tt])
        eps = (x - np.sqrt(ab) * self.x0) / np.sqrt(1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], 1)


def test_the_plain_schedule_is_the_base_schedule_bit_for_bit():
    base = make_betas("linear", 1000)
    s = Schedule(base)
    assert np.array_equal(s.betas, base) and s.timestep_map == list(range(1000))
    assert np.array_equal(s.alphas_cumprod, alphas_cumprod(base))


def test_a_respaced_schedule_keeps_alpha_bar_at_its_timesteps():
    base = make_betas("linear", 1000)
    kept = respaced_timesteps(1000, 50)
    s = Schedule(base, kept)
    assert np.allclose(s.alphas_cumprod, alphas_cumprod(base)[kept], rtol=0, atol=0)
    assert np.allclose(np.cumprod(1 - s.betas), s.alphas_cumprod, rtol=1e-12)


def test_respaced_timesteps():
    ts = respaced_timesteps(1000, 50)
    assert len(ts) == 50 and ts[:4] == [0, 20, 41, 61] and ts[-1] == 999
    assert respaced_timesteps(10, 10) == list(range(10))
    with pytest.raises(BenchError):
        respaced_timesteps(10, 11)


@pytest.mark.parametrize("kind, tol", [("ddim", 1e-4), ("ancestral", 0.05)])
def test_with_an_oracle_model_sampling_ends_at_its_target(kind, tol):
    x0 = torch.rand(2, 3, 8, 8) * 1.6 - 0.8
    x = sample_images(Oracle(x0), FLAGS, 2, generator=torch.Generator().manual_seed(0),
                      config=SamplerConfig(kind=kind, steps=20))
    # DDIM eta=0 is exact; ancestral adds noise of the last steps' (tiny) variance: sqrt(beta_1) ~ 0.04 at 20 steps
    assert float((x - x0).abs().max()) < tol


@pytest.mark.parametrize("kind", ["ancestral", "ddim"])
def test_the_model_gets_the_original_timesteps_not_the_respaced_index(kind):
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    sample_images(model, FLAGS, 2, generator=torch.Generator().manual_seed(0), config=SamplerConfig(kind=kind, steps=20))
    kept = respaced_timesteps(1000, 20)
    assert seen == [[t, t] for t in reversed(kept)]


def test_an_oracle_mid_trajectory_prediction_needs_the_right_alpha_bar():
    # One DDIM step from x_t at the kept step i: with the right timestep the oracle's x0 is exact; handed
    # the respaced index instead (the classic respacing bug) the step lands elsewhere.
    x0 = torch.rand(1, 3, 8, 8) * 1.6 - 0.8
    kept = respaced_timesteps(1000, 20)
    sched = Schedule(make_betas("linear", 1000), kept)
    i = 10
    ab = sched.alphas_cumprod[i]
    x_t = float(np.sqrt(ab)) * x0 + float(np.sqrt(1 - ab)) * torch.randn(1, 3, 8, 8)
    cfg = SamplerConfig(kind="ddim")
    good = _step(Oracle(x0), FLAGS, sched, i, x_t, torch.zeros_like(x0), cfg)
    bad = _step(Oracle(x0, use_index_of=kept), FLAGS, sched, i, x_t, torch.zeros_like(x0), cfg)
    abp = sched.alphas_cumprod_prev[i]
    expected = float(np.sqrt(abp)) * x0 + float(np.sqrt(1 - abp)) * (x_t - float(np.sqrt(ab)) * x0) / float(np.sqrt(1 - ab))
    assert torch.allclose(good, expected, atol=1e-5)
    assert float((bad - expected).abs().max()) > 0.05


@pytest.mark.parametrize("v, which", [(-1.0, "posterior"), (1.0, "beta")])
def test_one_learned_sigma_step_against_the_hand_formula(v, which):
    sched = Schedule(make_betas("linear", 1000))
    i = 500
    x, eps, noise = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    model = lambda xt, t: torch.cat([eps, torch.full_like(eps, v)], 1)  # noqa: E731
    got = _step(model, FLAGS, sched, i, x, noise, SamplerConfig(clip_denoised=False))
    ab, abp, beta = sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i], sched.betas[i]
    x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    mean = beta * np.sqrt(abp) / (1 - ab) * x0 + (1 - abp) * np.sqrt(1 - beta) / (1 - ab) * x
    var = beta * (1 - abp) / (1 - ab) if which == "posterior" else beta
    assert torch.allclose(got, mean + np.sqrt(var) * noise, atol=1e-5)


@pytest.mark.parametrize("kind", ["ancestral", "ddim"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_a_real_unet_samples_deterministically(kind, learn_sigma):
    flags = ADMFlags(image_size=16, num_channels=32, channel_mult="1,1", attention_resolutions="",
                     learn_sigma=learn_sigma)
    torch.manual_seed(0)
    model = ADMUNet(flags).eval()
    cfg = SamplerConfig(kind=kind, steps=4)
    a = sample_images(model, flags, 2, generator=torch.Generator().manual_seed(1), config=cfg)
    b = sample_images(model, flags, 2, generator=torch.Generator().manual_seed(1), config=cfg)
    c = sample_images(model, flags, 2, generator=torch.Generator().manual_seed(2), config=cfg)
    assert a.shape == (2, 3, 16, 16) and float(a.abs().max()) <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("flag, kind", [(False, "ancestral"), ("False", "ancestral"), ("false", "ancestral"),
                                        ("0", "ancestral"), (0, "ancestral"), (True, "ddim"), ("True", "ddim"),
                                        ("1", "ddim")])
def test_c11_the_use_ddim_flag_is_never_parsed_by_truthiness(flag, kind):
    assert sampler_kind_from_flag(flag) == kind


def test_bad_sampler_settings_are_one_line_errors():
    for bad in (dict(kind="euler"), dict(steps=0), dict(eta=-1.0)):
        with pytest.raises(BenchError):
            SamplerConfig(**bad)
    with pytest.raises(BenchError, match="'maybe'"):
        sampler_kind_from_flag("maybe")
