"""DDPM pretraining on unlabeled images (the training loop behind ``bench pretrain ddpm``).

Objective (Ho et al. 2020; Nichol & Dhariwal 2021, "Improved DDPM"): t ~ U{0..T-1}, x_t = q_sample(x0, t, eps),
L_simple = MSE(eps_pred, eps). With ``learn_sigma`` the model also outputs v in [-1, 1] that interpolates the
log-variance between the two bounds, and the hybrid loss adds L_vlb (KL to the true posterior, the discretized
Gaussian decoder NLL at t = 0) computed on a STOP-GRADIENT mean, so L_vlb only trains the variance.

Convention: every L_vlb term is in bits per dimension (mean over C*H*W, divided by ln 2), and it is weighted by
T/1000. A one-sample estimate of the paper's L_vlb = sum_t L_t is T * L_t, so with the paper's lambda = 0.001 the
term is lambda * T * L_t = (T/1000) * L_t: the same weighting for any number of diffusion steps.

Everything random (model init, batch indices, flips, timesteps, noise, dropout) comes from one seeded
``torch.Generator`` whose state is checkpointed, so a resumed run ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from backbones._adm_unet import ADMFlags, ADMUNet
from backbones._diffusion import alphas_cumprod, make_betas
from bench.errors import BenchError, CheckpointError

STATE_FILE = "train_state.pt"
EMA_FILE = "model_ema.safetensors"
LOG_EVERY = 100


class DiffusionLoss:
    """Per-sample diffusion training losses for one noise schedule (tables are float32 on ``device``).

    Example:
        >>> loss_fn = DiffusionLoss(ADMFlags(diffusion_steps=100, learn_sigma=True))
        >>> x0, noise, t = torch.zeros(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0, 99])
        >>> x_t = loss_fn.q_sample(x0, t, noise)
        >>> terms = loss_fn(torch.zeros(2, 6, 4, 4), x0, x_t, t, noise)
        >>> sorted(terms), terms["loss"].shape
        (['loss', 'mse', 'vb'], torch.Size([2]))
    """

    def __init__(self, flags: ADMFlags, device: str | torch.device = "cpu") -> None:
        steps = flags.diffusion_steps
        if steps < 2:  # the clipped posterior variance at t=0 borrows the value at t=1
            raise BenchError(f"diffusion_steps must be >= 2 for training, got {steps}")
        # float64 numpy for the schedule, float32 per-t lookups (as the reference numerics do)
        betas = make_betas(flags.noise_schedule, steps)
        if not np.all((betas > 0) & (betas <= 1)):  # the linear schedule scales by 1000/steps: too few steps break it
            raise BenchError(f"noise_schedule={flags.noise_schedule!r} with diffusion_steps={steps} gives betas "
                             f"outside (0, 1] (max {betas.max():.3g}); use more diffusion steps")
        ab = alphas_cumprod(betas)
        ab_prev = np.append(1.0, ab[:-1])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        tables = {
            "sqrt_ab": np.sqrt(ab),
            "sqrt_one_minus_ab": np.sqrt(1.0 - ab),
            "sqrt_recip_ab": np.sqrt(1.0 / ab),
            "sqrt_recipm1_ab": np.sqrt(1.0 / ab - 1.0),
            "post_coef_x0": betas * np.sqrt(ab_prev) / (1.0 - ab),
            "post_coef_xt": (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab),
            # posterior variance is 0 at t=0; log of it is clipped to the t=1 value
            "post_logvar": np.log(np.append(post_var[1], post_var[1:])),
            "log_beta": np.log(betas),
        }
        self.tables = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in tables.items()}
        self.num_steps = steps
        self.vlb_weight = steps / 1000.0

    def _at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.tables[name][t].view(-1, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise ``x0`` to per-sample steps ``t``: sqrt(ab_t) * x0 + sqrt(1 - ab_t) * noise.

        >>> x0, noise = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
        >>> round(DiffusionLoss(ADMFlags()).q_sample(x0, torch.tensor([0]), noise).max().item(), 5)  # sqrt(1 - 1e-4)
        0.99995
        """
        return self._at("sqrt_ab", t) * x0 + self._at("sqrt_one_minus_ab", t) * noise

    def vlb_bits(self, eps: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """L_t in bits/dim per sample: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0.

        >>> f = DiffusionLoss(ADMFlags(diffusion_steps=100))
        >>> x0, eps = torch.zeros(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
        >>> t = torch.tensor([5]); x_t = f.q_sample(x0, t, eps)
        >>> bool(f.vlb_bits(eps, -torch.ones_like(eps), x0, x_t, t).abs() < 1e-4)  # exact eps, v=-1: KL = 0
        True
        """
        true_mean = self._at("post_coef_x0", t) * x0 + self._at("post_coef_xt", t) * x_t
        true_logvar = self._at("post_logvar", t)
        pred_x0 = self._at("sqrt_recip_ab", t) * x_t - self._at("sqrt_recipm1_ab", t) * eps
        model_mean = self._at("post_coef_x0", t) * pred_x0 + self._at("post_coef_xt", t) * x_t
        frac = (v + 1.0) / 2.0
        model_logvar = frac * self._at("log_beta", t) + (1.0 - frac) * true_logvar
        kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).mean(dim=(1, 2, 3))
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def __call__(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> dict[str, torch.Tensor]:
        eps = model_out[:, :3]
        mse = (eps - noise).pow(2).mean(dim=(1, 2, 3))
        if model_out.shape[1] == 3:  # learn_sigma False: L_simple only
            return {"mse": mse, "vb": torch.zeros_like(mse), "loss": mse}
        # stop-gradient on eps: L_vlb must train the variance only, the mean is trained by L_simple
        vb = self.vlb_bits(eps.detach(), model_out[:, 3:], x0, x_t, t)
        return {"mse": mse, "vb": vb, "loss": mse + self.vlb_weight * vb}


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats.

    >>> float(normal_kl(torch.tensor(0.), torch.tensor(0.), torch.tensor(1.), torch.tensor(0.)))
    0.5
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-probability (nats) of 8-bit data x in [-1, 1] under a Gaussian integrated over each pixel's bin.

    Bins are 2/255 wide; the outermost bins extend to -inf / +inf. Uses the exact normal CDF.

    >>> lp = discretized_gaussian_log_likelihood(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([-10.0]))
    >>> bool(lp.abs() < 1e-6)   # tiny scale centred on the pixel: the whole mass is in its bin
    True
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


def pretrain_ddpm(images: Sequence[np.ndarray], out_dir: Path, *, flags: ADMFlags, steps: int,
                  batch_size: int = 16, lr: float = 1e-4, ema_rate: float = 0.9999, seed: int = 0,
                  save_every: int = 500, random_flip: bool = True, device: str = "cpu",
                  progress: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """Train an ADM UNet on uint8 HxWx3 images; resume from ``out_dir``; return the EMA safetensors path.

    Example:
        >>> imgs = [np.full((16, 16, 3), 128, np.uint8)] * 2
        >>> f = ADMFlags(image_size=16, num_channels=32, channel_mult="1,1", attention_resolutions="",
        ...              num_res_blocks=1, diffusion_steps=50)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pretrain_ddpm(imgs, Path(tmp), flags=f, steps=2, batch_size=2, progress=False)
        >>> path.name
        'model_ema.safetensors'
    """
    flags = ADMFlags.from_dict(flags) if isinstance(flags, Mapping) else flags
    _check_arguments(images, flags, steps, batch_size, save_every, lr, ema_rate)
    loss_fn = DiffusionLoss(flags, device)  # validates the schedule before a large model is built
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: None)
    settings = {"batch_size": batch_size, "lr": lr, "ema_rate": ema_rate, "seed": seed, "random_flip": random_flip}

    generator = torch.Generator().manual_seed(seed)  # CPU: the same draws on every device
    init_seed = int(torch.randint(2**62, (1,), generator=generator))
    with _private_global_rng(init_seed, "cpu"):  # nn.Module init draws from the global RNG
        # fp32 master weights: mixed-precision training (loss scaling) is not implemented; use_fp16 stays in
        # the saved flags because it only chooses inference numerics, the checkpoint is float32 either way
        model = ADMUNet(replace(flags, use_fp16=False))
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    step, losses = 0, []

    state_path, ema_path = out_dir / STATE_FILE, out_dir / EMA_FILE
    if state_path.exists():
        state = _load_train_state(state_path, flags)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # an explicit lr wins over the saved one
            group["lr"] = lr
        ema = {k: v.to(device) for k, v in state["ema"].items()}
        generator.set_state(state["generator"])
        step, losses = int(state["step"]), state["losses"].tolist()
        changed = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
        note = f"; changed settings (old, new): {changed}" if changed else ""
        say(f"resuming from step {step} of {state_path}{note}")
        if step >= steps:
            say(f"{state_path} is already at step {step} >= steps={steps}; nothing to train")

    trained = False
    with tqdm(total=steps, initial=min(step, steps), disable=not progress, desc="pretrain ddpm", unit="step") as bar:
        while step < steps:
            # fixed draw order per step: indices, flips, timesteps, noise, dropout seed
            x0 = _draw_batch(images, batch_size, generator, flags.image_size, random_flip).to(device)
            t = torch.randint(flags.diffusion_steps, (batch_size,), generator=generator).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            dropout_seed = int(torch.randint(2**62, (1,), generator=generator))
            x_t = loss_fn.q_sample(x0, t, noise)
            with _private_global_rng(dropout_seed, device) if flags.dropout > 0 else contextlib.nullcontext():
                terms = loss_fn(model(x_t, t), x0, x_t, t, noise)
            loss = terms["loss"].mean()
            if not torch.isfinite(loss):  # keep the last good checkpoint instead of saving NaNs
                raise BenchError(f"training loss became {loss.item()} at step {step + 1}; try a lower lr than {lr}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # EMA warm-up: a 0.9999 average of a 30-step run would still be the random init
            _update_ema(ema, model, min(ema_rate, (1 + step) / (10 + step)))
            step += 1
            trained = True
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step % LOG_EVERY == 0:
                say(f"step {step}/{steps} loss {np.mean(losses[-LOG_EVERY:]):.4f}")
            if step % save_every == 0 or step == steps:
                _save_checkpoint(out_dir, model, ema, optimizer, generator, step, flags, losses, settings)
    if not trained and not ema_path.exists():  # resumed a finished run whose EMA file was deleted
        _save_checkpoint(out_dir, model, ema, optimizer, generator, step, flags, losses, settings)
    return ema_path


def _check_arguments(images: Sequence[np.ndarray], flags: ADMFlags, steps: int, batch_size: int,
                     save_every: int, lr: float, ema_rate: float) -> None:
    if flags.class_cond:
        raise BenchError("class_cond=True is not supported by pretraining: it trains on unlabeled images only")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("save_every", save_every)):
        if not isinstance(value, int) or value < 1:
            raise BenchError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise BenchError(f"lr must be > 0, got {lr!r}")
    if not 0.0 <= ema_rate <= 1.0:
        raise BenchError(f"ema_rate must be in [0, 1], got {ema_rate!r}")
    if len(images) == 0:
        raise BenchError("no images to train on")


def _draw_batch(images: Sequence[np.ndarray], batch_size: int, generator: torch.Generator, image_size: int,
                random_flip: bool) -> torch.Tensor:
    """Uniformly drawn (with replacement) batch as float32 [B, 3, S, S] in [-1, 1]."""
    indices = torch.randint(len(images), (batch_size,), generator=generator).tolist()
    arrays = []
    for i in indices:  # checked when drawn: a lazy or endless dataset (the demo's) is never scanned up front
        image = np.asarray(images[i])
        if image.dtype != np.uint8 or image.shape != (image_size, image_size, 3):
            raise BenchError(f"image at index {i} is {image.dtype} {'x'.join(map(str, image.shape))}; "
                             f"expected uint8 {image_size}x{image_size}x3 (flags.image_size={image_size})")
        arrays.append(image)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1.0
    if random_flip:
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x


@contextlib.contextmanager
def _private_global_rng(seed: int, device: str | torch.device):
    """Seed the global RNG of ``device`` for the block and restore it afterwards (dropout/init draw from it)."""
    dev = torch.device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(seed)
        yield


@torch.no_grad()
def _update_ema(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    for name, param in model.named_parameters():
        ema[name].mul_(decay).add_(param.detach(), alpha=1.0 - decay)


def _ema_state_dict(model: torch.nn.Module, ema: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict (official key names and order) with parameters replaced by their EMA."""
    return {k: ema.get(k, v).detach().to("cpu", torch.float32).contiguous().clone()
            for k, v in model.state_dict().items()}


def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Write through a temp file in the same folder, then os.replace: never a half-written ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _save_checkpoint(out_dir: Path, model: torch.nn.Module, ema: Mapping[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer, generator: torch.Generator, step: int, flags: ADMFlags,
                     losses: list[float], settings: dict[str, Any]) -> None:
    ema_sd = _ema_state_dict(model, ema)
    metadata = {"bench_arch": json.dumps(flags.to_dict()), "steps": str(step)}
    # EMA first: if we die between the two writes, resuming from the older state just redoes a few steps
    _atomic_write(out_dir / EMA_FILE, lambda tmp: save_file(ema_sd, tmp, metadata=metadata))
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "ema": ema_sd,
             "optimizer": optimizer.state_dict(), "step": step, "generator": generator.get_state(),
             "flags": flags.to_dict(), "settings": settings,
             "losses": torch.tensor(losses, dtype=torch.float32)}  # per-step mean batch loss, for curves
    _atomic_write(out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))


def _load_train_state(path: Path, flags: ADMFlags) -> dict[str, Any]:
    """Read ``train_state.pt`` (no code execution) and check it was trained with ``flags``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    for key in ("model", "ema", "optimizer", "step", "generator", "flags", "settings", "losses"):
        if not isinstance(state, dict) or key not in state:
            raise CheckpointError(f"{path} is not a pretraining state: missing key {key!r}")
    saved = ADMFlags.from_dict(state["flags"]).to_dict()
    for name, value in flags.to_dict().items():
        if saved.get(name) != value:
            raise BenchError(f"{path} was trained with {name}={saved.get(name)!r} but {name}={value!r} was given; "
                             f"use the same flags to resume or another out_dir")
    return state
