"""Reverse-process sampling for an ADM UNet: ancestral (DDPM) and DDIM, over all steps or respaced.

Written from the equations (Ho et al. 2020; Nichol & Dhariwal 2021 for the learned variance and the
respacing; Song et al. 2021 for DDIM), not from any implementation. Tables are float64 numpy, the
update runs in float32, like :mod:`backbones._diffusion`.

Respacing keeps a subset ``t_0 < ... < t_{n-1}`` of the model's timesteps: the respaced schedule has
alpha_bar_i = alpha_bar[t_i] and beta_i = 1 - alpha_bar[t_i] / alpha_bar[t_{i-1}], and the model is
always given the ORIGINAL index ``t_i`` (it was trained on those), never ``i``.

For step i (ab = alpha_bar_i, ab_prev = alpha_bar_{i-1}, 1 at i = 0):

- x0 = sqrt(1/ab) x_t - sqrt(1/ab - 1) eps, clamped to [-1, 1] when ``clip_denoised``;
- ancestral: mean = beta sqrt(ab_prev)/(1-ab) x0 + (1-ab_prev) sqrt(1-beta)/(1-ab) x_t; with a learned
  sigma log_var = f log(beta) + (1-f) log(posterior var, clipped at i = 0), f = (v+1)/2; without, the
  "fixed large" variance (beta, with the posterior variance at i = 0); noise added for i > 0;
- DDIM: eps' from the clamped x0, sigma = eta sqrt((1-ab_prev)/(1-ab)) sqrt(1 - ab/ab_prev),
  x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps' (+ sigma noise for i > 0).

Every step draws its noise tensor from the caller's generator, even when it is unused (DDIM with
eta = 0, the last step), so the stream's position never depends on the sampler's settings.

Example:
    >>> import torch
    >>> from backbones._adm_unet import ADMFlags, ADMUNet
    >>> flags = ADMFlags(image_size=32, num_channels=32, channel_mult="1,1", attention_resolutions="", learn_sigma=True)
    >>> x = sample_images(ADMUNet(flags).eval(), flags, 2, generator=torch.Generator().manual_seed(0),
    ...                   config=SamplerConfig(kind="ddim", steps=3))
    >>> tuple(x.shape), bool(x.abs().max() <= 1)
    ((2, 3, 32, 32), True)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from backbones._diffusion import alphas_cumprod, make_betas
from bench.errors import BenchError

KINDS = ("ancestral", "ddim")


@dataclass(frozen=True)
class SamplerConfig:
    """Which sampler, over how many steps.

    Example:
        >>> SamplerConfig(kind="ddim", steps=50).to_dict()["kind"]
        'ddim'
    """

    kind: str = "ancestral"
    steps: int | None = None  # None: every diffusion step; else respaced to this many
    eta: float = 0.0  # DDIM only
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BenchError(f"unknown sampler {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.steps is not None and (isinstance(self.steps, bool) or int(self.steps) < 1):
            raise BenchError(f"sampling steps must be a positive integer, got {self.steps!r}")
        if not float(self.eta) >= 0:
            raise BenchError(f"DDIM eta must be >= 0, got {self.eta!r}")

    def to_dict(self) -> dict:
        return asdict(self)


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def sampler_kind_from_flag(use_ddim: Any) -> str:
    """The official ``--use_ddim`` flag, parsed strictly (spec C11: ``bool("False")`` is True).

    Example:
        >>> sampler_kind_from_flag("False"), sampler_kind_from_flag(True)
        ('ancestral', 'ddim')
    """
    if isinstance(use_ddim, bool):
        return "ddim" if use_ddim else "ancestral"
    if isinstance(use_ddim, int) and use_ddim in (0, 1):
        return "ddim" if use_ddim else "ancestral"
    text = str(use_ddim).strip().lower()
    if text in _TRUE:
        return "ddim"
    if text in _FALSE:
        return "ancestral"
    raise BenchError(f"use_ddim must be true or false, got {use_ddim!r}")


def respaced_timesteps(num_steps: int, count: int) -> list[int]:
    """``count`` evenly spaced timesteps of ``0..num_steps-1``, both ends included (one step: the last).

    Example:
        >>> ts = respaced_timesteps(1000, 50)
        >>> ts[:3], ts[-1], len(ts)
        ([0, 20, 41], 999, 50)
    """
    if not 1 <= count <= num_steps:
        raise BenchError(f"cannot respace {num_steps} diffusion steps to {count}; use 1..{num_steps}")
    if count == 1:
        return [num_steps - 1]
    stride = (num_steps - 1) / (count - 1)
    return sorted({int(round(i * stride)) for i in range(count)})


class Schedule:
    """A (possibly respaced) schedule: float64 tables indexed by the respaced step i.

    Example:
        >>> s = Schedule(make_betas("linear", 1000), respaced_timesteps(1000, 10))
        >>> len(s), s.timestep_map[-1]
        (10, 999)
    """

    def __init__(self, base_betas: np.ndarray, kept: list[int] | None = None) -> None:
        base_ab = alphas_cumprod(base_betas)
        kept = list(range(len(base_betas))) if kept is None else list(kept)
        ab = base_ab[kept]
        ab_prev = np.append(1.0, ab[:-1])
        self.timestep_map = kept
        self.alphas_cumprod, self.alphas_cumprod_prev = ab, ab_prev
        # the plain schedule keeps its own betas bit for bit; a respaced one derives them from alpha_bar
        self.betas = np.asarray(base_betas, np.float64) if len(kept) == len(base_betas) else 1.0 - ab / ab_prev
        self.posterior_variance = self.betas * (1.0 - ab_prev) / (1.0 - ab)
        post = self.posterior_variance
        self.posterior_log_variance = np.log(np.append(post[1], post[1:]) if len(post) > 1 else self.betas)
        self.fixed_large_log_variance = np.log(np.append(post[1], self.betas[1:]) if len(post) > 1 else self.betas)

    def __len__(self) -> int:
        return len(self.timestep_map)


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32, device=like.device)


def _step(model: Any, flags: Any, sched: Schedule, i: int, x: torch.Tensor, noise: torch.Tensor,
          config: SamplerConfig) -> torch.Tensor:
    """x_{i-1} from x_i (one reverse step)."""
    ab, ab_prev, beta = sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i], sched.betas[i]
    t = torch.full((x.shape[0],), sched.timestep_map[i], dtype=torch.long, device=x.device)
    out = model(x, t).float()
    eps = out[:, :3]
    x0 = _f32(np.sqrt(1.0 / ab), x) * x - _f32(np.sqrt(1.0 / ab - 1.0), x) * eps
    if config.clip_denoised:
        x0 = x0.clamp(-1, 1)
    last = i == 0
    if config.kind == "ddim":
        eps = (_f32(np.sqrt(1.0 / ab), x) * x - x0) / _f32(np.sqrt(1.0 / ab - 1.0), x)
        sigma = config.eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
        mean = _f32(np.sqrt(ab_prev), x) * x0 + _f32(np.sqrt(max(1 - ab_prev - sigma**2, 0.0)), x) * eps
        return mean if last or sigma == 0 else mean + _f32(sigma, x) * noise
    mean = (_f32(beta * np.sqrt(ab_prev) / (1 - ab), x) * x0
            + _f32((1 - ab_prev) * np.sqrt(1 - beta) / (1 - ab), x) * x)
    if flags.learn_sigma:
        frac = (out[:, 3:] + 1) / 2
        log_var = frac * _f32(np.log(beta), x) + (1 - frac) * _f32(sched.posterior_log_variance[i], x)
    else:
        log_var = _f32(sched.fixed_large_log_variance[i], x).expand_as(x)
    return mean if last else mean + torch.exp(0.5 * log_var) * noise


@torch.no_grad()
def sample_images(model: Any, flags: Any, num: int, *, generator: torch.Generator,
                  config: SamplerConfig = SamplerConfig(), device: str | torch.device = "cpu",
                  progress: bool = False) -> torch.Tensor:
    """``num`` samples, float32 ``[num, 3, S, S]`` in [-1, 1]; all randomness from ``generator`` (CPU).

    Example:
        >>> SamplerConfig(kind="nope")
        Traceback (most recent call last):
        bench.errors.BenchError: unknown sampler 'nope'; use one of ancestral, ddim
    """
    from bench.progress import progress as progress_bar

    base = make_betas(flags.noise_schedule, flags.diffusion_steps)
    kept = None if config.steps is None else respaced_timesteps(len(base), int(config.steps))
    sched = Schedule(base, kept)
    size = (int(num), 3, flags.image_size, flags.image_size)
    x = torch.randn(size, generator=generator).to(device)  # drawn on CPU: device-independent values
    with progress_bar(total=len(sched), desc="sampling steps", unit="step", enabled=progress) as bar:
        for i in reversed(range(len(sched))):
            noise = torch.randn(size, generator=generator).to(device)
            x = _step(model, flags, sched, i, x, noise, config)
            bar.update(1)
    return x.clamp(-1, 1)
