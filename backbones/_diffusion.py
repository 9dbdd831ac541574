"""Noise schedules and the forward process q(x_t | x_0) of a Gaussian diffusion model.

The numerics follow the protocol spec (section 3.2) exactly, because the DDPM features depend on them:
the schedule and its square roots are computed in float64 (numpy), the two coefficients are cast to
float32, and the multiply-add runs in float32. ``t`` is a 0-based index: ``alphas_cumprod[0]`` already
includes the first factor (1 - beta_0).

Example:
    >>> import torch
    >>> ab = alphas_cumprod(make_betas("linear", 1000))
    >>> round(float(ab[50]), 8)
    0.96995149
    >>> q_sample(torch.zeros(2, 3, 4, 4), 50, torch.ones(1, 3, 4, 4), ab)[0, 0, 0, 0].item() == q_sample_coefficients(ab, 50)[1]
    True
"""
from __future__ import annotations

import math

import numpy as np
import torch

from bench.errors import BenchError

NOISE_SCHEDULES = ("linear", "cosine")


def make_betas(noise_schedule: str, steps: int) -> np.ndarray:
    """Per-step noise variances beta_t (float64) of the named schedule.

    "linear" (Ho et al. 2020): evenly spaced from 1e-4 to 0.02 at 1000 steps; both ends are scaled by
    1000/steps so that other step counts describe the same continuous process.
    "cosine" (Nichol & Dhariwal 2021): alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008,
    beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), clipped at 0.999 to avoid a singular last step.

    Example:
        >>> b = make_betas("linear", 1000)
        >>> b.dtype, float(b[0]), float(b[-1])
        (dtype('float64'), 0.0001, 0.02)
        >>> float(make_betas("cosine", 1000).max())
        0.999
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise BenchError(f"diffusion_steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    if noise_schedule == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    if noise_schedule == "cosine":
        def alpha_bar(frac: float) -> float:
            return math.cos((frac + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
        return np.array(betas, dtype=np.float64)
    raise BenchError(f"unknown noise_schedule {noise_schedule!r}; expected one of {', '.join(NOISE_SCHEDULES)}")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64.

    Example:
        >>> alphas_cumprod(np.array([0.5, 0.5])).tolist()
        [0.5, 0.25]
    """
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64), axis=0)


def q_sample_coefficients(alphas_cumprod: np.ndarray, t: int) -> tuple[float, float]:
    """(a_t, b_t) = (float32(sqrt(alpha_bar_t)), float32(sqrt(1 - alpha_bar_t))) as Python floats.

    The square roots are taken in float64 first, then rounded to float32, as the reference does; a
    float32 square root would differ in the last bit.

    Example:
        >>> ab = alphas_cumprod(make_betas("linear", 1000))
        >>> [round(c, 8) for c in q_sample_coefficients(ab, 150)]
        [0.88650268, 0.46272343]
    """
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < len(ab):
        raise BenchError(f"diffusion step {t!r} is out of range; valid steps are 0..{len(ab) - 1}")
    a = np.float32(np.sqrt(ab[t]))
    b = np.float32(np.sqrt(1.0 - ab[t]))
    return float(a), float(b)


def q_sample(x0: torch.Tensor, t: int, noise: torch.Tensor, alphas_cumprod: np.ndarray) -> torch.Tensor:
    """x_t = a_t * x0 + b_t * noise in float32; ``noise`` ([1, ...] or x0's shape) broadcasts over the batch.

    Example:
        >>> ab = alphas_cumprod(make_betas("linear", 1000))
        >>> q_sample(torch.ones(2, 3, 8, 8), 0, torch.zeros(1, 3, 8, 8), ab).shape
        torch.Size([2, 3, 8, 8])
    """
    if noise.shape[1:] != x0.shape[1:] or noise.shape[0] not in (1, x0.shape[0]):
        raise BenchError(f"noise of shape {tuple(noise.shape)} does not fit images of shape {tuple(x0.shape)}")
    a, b = q_sample_coefficients(alphas_cumprod, t)
    # float32 scalar tensors, so the multiply-add is done in float32 exactly like the reference.
    a_t = torch.tensor(a, dtype=torch.float32, device=x0.device)
    b_t = torch.tensor(b, dtype=torch.float32, device=x0.device)
    return a_t * x0.float() + b_t * noise.to(device=x0.device, dtype=torch.float32)
