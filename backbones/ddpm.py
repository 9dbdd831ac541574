"""``ddpm``: pixel features from a guided-diffusion (ADM) UNet, as in Baranchuk et al. (ICLR 2022).

Each image x0 in [-1, 1] is noised to x_t = a_t x0 + b_t eps for every step t (one shared eps for all
steps and images by default; ``noise_mode`` gives the paper's Table 5 variants), run through the UNet, and the outputs of the chosen decoder blocks are returned at
their native resolution: step-major, blocks ascending within a step (spec section 3). The defaults
(blocks 5, 6, 7, 8, 12 at steps 50, 150, 250) give the paper's 8448 features per pixel.

Example:
    >>> import torch, bench
    >>> bb = bench.create_backbone("ddpm", **bench.get_backbone_class("ddpm").tiny)
    >>> [f.name for f in bb.feature_info][:2], bb.num_features
    (['t50.b5', 't50.b6'], 480)
    >>> [m.shape[1:] for m in bb.extract(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))][:1]
    [torch.Size([32, 8, 8])]
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from bench import Backbone, BenchError, FeatureInfo, Weights, register_backbone
from bench.contract import validate_indices
from bench.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the noise variants of paper Table 5 (see :class:`DDPM`)
NOISE_MODES = ("shared", "per_step", "per_image")

_YANDEX = "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/models/ddpm_checkpoints/"
_OPENAI = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"

#: The official LSUN/FFHQ model flags (guided-diffusion README, ddpm-segmentation MODEL_FLAGS).
LSUN_ARCH: Mapping[str, Any] = {
    "attention_resolutions": "32,16,8", "class_cond": False, "diffusion_steps": 1000, "dropout": 0.1,
    "image_size": 256, "learn_sigma": True, "noise_schedule": "linear", "num_channels": 256,
    "num_head_channels": 64, "num_res_blocks": 2, "resblock_updown": True, "use_fp16": True,
    "use_scale_shift_norm": True,
}
#: The shipped demo model: 64 px, 6 levels, so blocks 5..12 keep their LSUN roles.
DEMO_ARCH: Mapping[str, Any] = {
    "image_size": 64, "num_channels": 32, "num_res_blocks": 2, "channel_mult": "1,1,2,2,2,2",
    "attention_resolutions": "8,4,2", "num_head_channels": 32, "resblock_updown": True,
    "use_scale_shift_norm": True, "learn_sigma": True, "dropout": 0.0, "noise_schedule": "linear",
    "diffusion_steps": 1000,
}
#: Random-init test variant: 6 levels like LSUN. GroupNorm has 32 groups, so 32 channels at least, and
#: a group needs more than one value at batch 1: the 1x1 level of a 32 px model fails, hence 64 px.
TINY_ARCH: Mapping[str, Any] = {
    "image_size": 64, "num_channels": 32, "num_res_blocks": 2, "channel_mult": "1,1,1,1,1,1",
    "attention_resolutions": "4,2", "num_head_channels": 16, "resblock_updown": True,
    "use_scale_shift_norm": True, "learn_sigma": True,
}


def _lsun(tag: str, paper: Mapping[str, tuple[float, float]]) -> Weights:
    return Weights(
        tag=tag, url=(f"{_YANDEX}{tag}.pt", f"{_OPENAI}{tag}.pt"), domain=tag, license="MIT (guided-diffusion)",
        arch=dict(LSUN_ARCH), paper_miou=paper, description=f"guided-diffusion ADM trained on {tag} (256 px)",
    )


def _safetensors_arch(path: Path) -> dict[str, Any] | None:
    """The ``bench_arch`` flags our pretraining stores in safetensors metadata, if any."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("bench_arch")
    except Exception as err:  # a corrupt header: report the file, not a Rust error
        raise CheckpointError(f"cannot read safetensors header of {path}: {err}") from err
    if text is None:
        return None
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"metadata 'bench_arch' of {path} is not valid JSON: {err}") from err
    if not isinstance(arch, dict):
        raise CheckpointError(f"metadata 'bench_arch' of {path} must be a JSON object, got {type(arch).__name__}")
    return arch


@register_backbone("ddpm", "adm", "guided_diffusion")
class DDPM(Backbone):
    """Decoder-block activations of a guided-diffusion UNet at several noise levels.

    ``checkpoint`` (a plain state dict ``.pt`` or ``.safetensors``) with ``arch`` (official flag names,
    official defaults for missing ones) replaces the tag's weights; ``noise`` fixes eps explicitly,
    otherwise it is ``randn(1, 3, S, S)`` from a CPU generator seeded with ``seed`` (spec 3.3).

    ``noise_mode`` (paper Table 5): ``"shared"`` (default) one eps for every step and image;
    ``"per_step"`` one eps_t per step, drawn from ``derive_seed(seed, "ddpm.noise.step", t)``, shared by
    all images (train and test); ``"per_image"`` a fresh eps for every (image, step), drawn from the seed,
    the step and the sha256 of the image's 8-bit content, so test images get noise that no training
    image saw, and features stay a pure function of the image (hence cacheable). The paper's third row
    also redraws the training noise at every probe iteration; with cached features each training
    image keeps its one draw.

    Example:
        >>> import bench
        >>> bench.create_backbone("ddpm.lsun_cat", pretrained=False, device="meta").num_features
        8448
    """

    weights = {
        "lsun_bedroom": _lsun("lsun_bedroom", {"bedroom_28": (49.4, 1.9), "ade_bedroom_30": (34.6, 1.7)}),
        "lsun_cat": _lsun("lsun_cat", {"cat_15": (53.7, 3.3)}),
        "lsun_horse": _lsun("lsun_horse", {"horse_21": (65.0, 0.8)}),
        "ffhq": Weights(
            tag="ffhq", url=(f"{_YANDEX}ffhq.pt",), domain="ffhq", license="see ddpm-segmentation",
            arch=dict(LSUN_ARCH), paper_miou={"ffhq_34": (59.1, 1.4), "celeba_19": (59.9, 1.0)},
            description="ADM trained on FFHQ-256 by the ddpm-segmentation authors (LSUN model flags)",
        ),
        "demo": Weights(
            tag="demo", file="weights/ddpm_demo.safetensors", domain="demo", license="MIT",
            sha256="bb69b7870b5e463186206400a5e620ad19febb45f344b00496babe9535f1b26d",
            arch=dict(DEMO_ARCH), description="small 64 px ADM trained on the built-in demo dataset",
        ),
    }
    default_tag = "lsun_bedroom"
    tiny = {"pretrained": False, "arch": dict(TINY_ARCH)}

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu",
                 blocks: Sequence[int] = (5, 6, 7, 8, 12), steps: Sequence[int] = (50, 150, 250),
                 seed: int = 0, noise: "torch.Tensor | None" = None, checkpoint: str | Path | None = None,
                 arch: Mapping[str, Any] | None = None, fp16: bool = False, noise_mode: str = "shared") -> None:
        super().__init__(tag=tag, pretrained=pretrained, device=device)
        import torch

        from backbones._adm_unet import ADMUNet

        path = None
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise CheckpointError(f"ddpm checkpoint file not found: {path}")
            if tag is None:
                self.tag = None  # a user's own weights: no tag, hence no paper numbers attached to them
        # Flags: explicit arch, else those stored by our pretraining, else the tag's (official) ones.
        flag_source = arch if arch is not None else (_safetensors_arch(path) if path is not None else None)
        if flag_source is None:
            flag_source = self.weights[tag or self.default_tag].arch
        model = self._configure(flag_source, blocks, steps)
        self.fp16 = bool(fp16)
        if noise_mode not in NOISE_MODES:
            raise BenchError(f"ddpm noise_mode must be one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")
        if noise is not None and noise_mode != "shared":
            raise BenchError(f"ddpm: an explicit noise tensor is one shared eps; it cannot go with noise_mode={noise_mode!r}")
        self.noise_mode = noise_mode
        self._set_noise(noise, seed)
        if path is None and pretrained:
            # Fetched only now, so that a wrong block or step costs no download.
            from bench.hub import fetch_weights

            path = fetch_weights(self.weights_entry, module_file=__file__, name=f"ddpm.{self.tag}")
            stored = None if arch is not None else _safetensors_arch(path)
            if stored is not None:
                model = self._configure(stored, blocks, steps)
                self._set_noise(noise, seed)

        if path is not None and pretrained:
            from bench.checkpoints import load_state_dict, load_strict
            from bench.hub import sha256_file

            load_strict(model, load_state_dict(path), source=str(path))  # materialises on CPU
            self._weights_sha256 = sha256_file(path)
        elif str(device) != "meta":
            # A random-init control: the checkpoint (if any) gave its architecture, never its tensors.
            # Seeded, so random-init features are reproducible; fork_rng leaves the global RNG untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = ADMUNet(self.flags)
        model = model.to(device)
        if self.fp16:
            model.convert_to_fp16()  # official order: load on CPU, move, convert, eval
        self.model = model.eval().requires_grad_(False)

    def _configure(self, flag_source: Mapping[str, Any], blocks: Sequence[int], steps: Sequence[int]) -> "Any":
        """Parse the flags, validate blocks and steps, and return the model built on the meta device."""
        import torch

        from backbones._adm_unet import ADMFlags, ADMUNet
        from backbones._diffusion import alphas_cumprod, make_betas

        self.flags = ADMFlags.from_dict(flag_source)
        if self.flags.class_cond:
            raise BenchError("ddpm features need an unconditional model; arch has class_cond=True")
        with torch.device("meta"):  # instant even at 550M parameters, and allocates nothing
            model = ADMUNet(self.flags)
        self.blocks = tuple(sorted(validate_indices(blocks, limit=model.num_output_blocks, owner="ddpm")))
        self.steps = tuple(validate_indices(steps, limit=self.flags.diffusion_steps, owner="ddpm", what="steps"))
        self.image_size = self.flags.image_size
        self._block_shapes = model.block_shapes()
        self._alphas_cumprod = alphas_cumprod(make_betas(self.flags.noise_schedule, self.flags.diffusion_steps))
        return model

    def _set_noise(self, noise: "torch.Tensor | None", seed: int) -> None:
        import torch

        size = (1, 3, self.image_size, self.image_size)
        if noise is not None:
            if not torch.is_tensor(noise) or tuple(noise.shape) != size:
                raise BenchError(f"ddpm noise must be a tensor of shape {list(size)}, got "
                                 f"{list(noise.shape) if torch.is_tensor(noise) else type(noise).__name__}")
            cpu_noise = noise.detach().to("cpu", torch.float32).contiguous()
            self.seed: int | None = None
            self._noise_sha256 = hashlib.sha256(cpu_noise.numpy().tobytes()).hexdigest()
        else:
            # Drawn on CPU so the values do not depend on the device (spec 8.3); one eps for everything.
            cpu_noise = torch.randn(size, generator=torch.Generator("cpu").manual_seed(seed))
            self.seed, self._noise_sha256 = seed, ""
        self.noise = cpu_noise.to(self.device)
        self._step_noise = {}
        if self.noise_mode == "per_step":
            from bench.seeding import derive_seed

            self._step_noise = {t: torch.randn(size, generator=torch.Generator("cpu").manual_seed(
                derive_seed(seed, "ddpm.noise.step", t))).to(self.device) for t in self.steps}

    def step_noises(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """The eps of each step (in step order) for images ``x`` in [-1, 1]: ``[1 or B, 3, S, S]`` each.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("ddpm", **DDPM.tiny, steps=[10, 20])
            >>> a, b = bb.step_noises(torch.zeros(2, 3, 64, 64))
            >>> a is b, tuple(a.shape)
            (True, (1, 3, 64, 64))
        """
        import torch

        if self.noise_mode == "shared":
            return [self.noise] * len(self.steps)
        if self.noise_mode == "per_step":
            return [self._step_noise[t] for t in self.steps]
        # per_image: keyed by the 8-bit image (x = u8 / 127.5 - 1), so the draw does not depend on the
        # batch an image is extracted in, nor on float rounding of the preprocessing.
        pixels = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        size = (1, *x.shape[1:])
        per_step = []
        for t in self.steps:
            draws = []
            for image in pixels:
                content = hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()
                key = hashlib.sha256(f"ddpm.noise.image/{self.seed}/{t}/{content}".encode()).digest()
                generator = torch.Generator("cpu").manual_seed(int.from_bytes(key[:8], "big") >> 1)
                draws.append(torch.randn(size, generator=generator))
            per_step.append(torch.cat(draws).to(self.device))
        return per_step

    @property
    def input_size(self) -> int:
        """The model's square image size (flag image_size)."""
        return self.image_size

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return [
            FeatureInfo(name=f"t{t}.b{b}", channels=self._block_shapes[b][0],
                        stride=self.image_size // self._block_shapes[b][1])
            for t in self.steps for b in self.blocks
        ]

    def preprocess(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 [B, 3, S, S] -> float32 in [-1, 1] (0 -> -1, 255 -> +1) on the device.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("ddpm", **DDPM.tiny)
            >>> x = bb.preprocess(torch.full((1, 3, 64, 64), 255, dtype=torch.uint8))
            >>> x.min().item(), x.max().item()
            (1.0, 1.0)
        """
        import torch

        self._check_images(images)
        if images.dtype != torch.uint8:
            raise BenchError(f"ddpm preprocess expects uint8 images, got {images.dtype}")
        return images.to(device=self.device, dtype=torch.float32) / 127.5 - 1

    def _check_images(self, x: "torch.Tensor") -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise BenchError(f"ddpm expects images of shape [B, 3, H, W], got {list(x.shape)}")
        h, w = x.shape[-2:]
        if h != w:
            raise BenchError(f"ddpm needs square images, got {h}x{w} (H x W)")
        if h != self.image_size:
            raise BenchError(f"this ddpm model takes {self.image_size}x{self.image_size} images, got {h}x{w}")

    def forward_features(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """x in [-1, 1], [B, 3, S, S] -> step-major list of [B, C, h, w] float32 maps.

        All steps of the batch go through ONE forward pass ([steps*B] images, each with its own t),
        which stops after the deepest requested block.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("ddpm", **DDPM.tiny, blocks=[8], steps=[10, 20])
            >>> [tuple(m.shape) for m in bb.forward_features(torch.zeros(2, 3, 64, 64))]
            [(2, 32, 16, 16), (2, 32, 16, 16)]
        """
        import torch

        from backbones._diffusion import q_sample

        self._check_images(x)
        x = x.to(device=self.device, dtype=torch.float32)
        batch = x.shape[0]
        noises = self.step_noises(x)
        noisy = torch.cat([q_sample(x, t, eps, self._alphas_cumprod) for t, eps in zip(self.steps, noises)])
        timesteps = torch.tensor(self.steps, dtype=torch.long, device=x.device).repeat_interleave(batch)
        with torch.no_grad():
            outputs = self.model.forward_blocks(noisy, timesteps, self.blocks)
        return [out[i * batch:(i + 1) * batch].float() for i in range(len(self.steps)) for out in outputs]

    def config(self) -> dict[str, Any]:
        """Base config plus blocks, steps, noise seed (or the explicit noise's sha256), flags and fp16.

        Example:
            >>> import bench
            >>> bench.create_backbone("ddpm", **DDPM.tiny, steps=[5]).config()["steps"]
            [5]
        """
        cfg = super().config()
        cfg.update({
            "blocks": list(self.blocks), "steps": list(self.steps), "seed": self.seed,
            "noise_sha256": self._noise_sha256, "arch": self.flags.to_dict(), "fp16": self.fp16,
        })
        if self.noise_mode != "shared":  # absent for the default, so existing cache and run keys still hold
            cfg["noise_mode"] = self.noise_mode
        return cfg

    @classmethod
    def pretrain(cls, *, images: Sequence[Any], out_dir: Path, steps: int, batch_size: int = 16, seed: int = 0,
                 device: str = "cpu", **options: Any) -> Path:
        """Train an ADM on unlabeled images (``bench pretrain ddpm``); returns the EMA safetensors path.

        ``options`` may hold guided-diffusion flags (default: the demo architecture) and the training
        settings ``lr``, ``ema_rate``, ``save_every``, ``random_flip``; the output is ready for
        ``bench run --backbone ddpm --weights PATH``.

        Example:
            >>> # DDPM.pretrain(images=bench.demo.unlabeled_images(10**6), out_dir=Path("runs/demo_ddpm"), steps=2000)
        """
        from dataclasses import fields

        from backbones._adm_unet import ADMFlags
        from backbones._ddpm_train import pretrain_ddpm

        flag_names = {f.name for f in fields(ADMFlags)}
        settings = {"lr", "ema_rate", "save_every", "random_flip"}
        unknown = set(options) - flag_names - settings
        if unknown:
            raise BenchError(f"unknown pretraining option(s) {sorted(unknown)}; flags: {sorted(flag_names)}, "
                             f"settings: {sorted(settings)}")
        flags = ADMFlags.from_dict({**DEMO_ARCH, **{k: v for k, v in options.items() if k in flag_names}})
        return pretrain_ddpm(images, Path(out_dir), flags=flags, steps=steps, batch_size=batch_size, seed=seed,
                             device=device, **{k: v for k, v in options.items() if k in settings})
