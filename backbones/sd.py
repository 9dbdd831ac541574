"""``sd``: pixel features from the UNet of Stable Diffusion (latent diffusion), on diffusers.

Each image (resized to ``image_size``, in [-1, 1]) is encoded by the VAE (the posterior mean, times the
VAE's ``scaling_factor``), noised to z_t = sqrt(a_t) z + sqrt(1 - a_t) eps at every step t with the
scheduler's alphas (DDPM forward process; eps drawn on CPU from ``seed``, one draw shared by all steps
and images, as in the ``ddpm`` plugin), and run through the UNet with the text embedding of ``prompt``
(the empty prompt by default; computed once). The outputs of the chosen up-blocks (``unet.up_blocks[i]``,
after its upsampler) are returned at their native latent resolution, step-major; with
``ensemble_size`` n > 1 every map is the mean over n noise draws (DIFT's ensemble). The UNet stops after
the deepest requested block.

Strides (image px per map px) for SD 1.5 / 2.1 (4 levels, latent = image / 8): up-block 0 -> 32,
1 -> 16, 2 -> 8, 3 -> 8; channels 1280, 1280, 640, 320. Defaults: blocks 1, 2 at t = 261 (DIFT's block
and step) -> 1920 features per pixel for both; all four blocks give 3520.

Example:
    >>> import torch, bench
    >>> bb = bench.create_backbone("sd", **bench.get_backbone_class("sd").tiny)
    >>> [(f.name, f.channels, f.stride) for f in bb.feature_info][:2]
    [('t50.up0', 64, 16), ('t50.up1', 32, 8)]
    >>> [tuple(m.shape) for m in bb.extract(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))][:2]
    [(1, 64, 4, 4), (1, 32, 8, 8)]
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from bench import Backbone, BenchError, FeatureInfo, Weights, register_backbone
from bench.contract import validate_indices
from bench.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2, "latent_channels": 4, "scaling_factor": 0.18215}
_UNET = {"in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280],
         "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
         "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
#: The public configs of the two releases (diffusers folders of stable-diffusion-v1-5 and stabilityai/
#: stable-diffusion-2-1): same UNet channels; 2.1 has OpenCLIP-H (1024, 23 layers), linear projections,
#: per-level heads, 96 x 96 latents (768 px) and v-prediction (which does not change the features).
ARCHS: Mapping[str, Mapping[str, Any]] = {
    "v1_5": {"unet": {**_UNET, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
             "vae": {**_VAE, "sample_size": 512},
             "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                              "num_attention_heads": 12, "hidden_act": "quick_gelu"},
             "tokens": {"bos": 49406, "eos": 49407, "pad": 49407},
             "scheduler": {**_SCHEDULER, "prediction_type": "epsilon"}},
    "v2_1": {"unet": {**_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                      "use_linear_projection": True},
             "vae": {**_VAE, "sample_size": 768},
             "text_encoder": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                              "num_attention_heads": 16, "hidden_act": "gelu"},
             "tokens": {"bos": 49406, "eos": 49407, "pad": 0},  # SD 2.x pads with "!" (id 0)
             "scheduler": {**_SCHEDULER, "prediction_type": "v_prediction"}},
    # Random-init test model: 3 levels (strides 16, 8, 8 at 64 px), a 4-level VAE (latent = image / 8).
    "tiny": {"unet": {"in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": [32, 32, 64],
                      "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                      "sample_size": 8, "cross_attention_dim": 32, "attention_head_dim": 8},
             "vae": {**_VAE, "block_out_channels": [16, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
                     "sample_size": 64},
             "text_encoder": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "max_position_embeddings": 8},
             "tokens": {"bos": 62, "eos": 63, "pad": 63},
             "scheduler": {**_SCHEDULER, "prediction_type": "epsilon"}},
}
_HF = "https://huggingface.co/"


def unet_maps(unet: Mapping[str, Any], vae: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(channels, stride in image px) of every up-block output, from the configs alone (no weights).

    Up-block i works at the resolution of down level n-1-i and upsamples x2 unless it is the last one.

    Example:
        >>> unet_maps(ARCHS["v1_5"]["unet"], ARCHS["v1_5"]["vae"])
        [(1280, 32), (1280, 16), (640, 8), (320, 8)]
    """
    channels = list(reversed(unet["block_out_channels"]))
    levels = len(channels)
    latent_stride = 2 ** (len(vae["block_out_channels"]) - 1)
    return [(channels[i], latent_stride * 2 ** (levels - 1 - min(i + 1, levels - 1))) for i in range(levels)]


def build_models(arch: Mapping[str, Any], *, meta: bool = False) -> dict[str, Any]:
    """unet, vae and text encoder of an arch (random init; on the meta device when weights will be assigned).

    Example:
        >>> sorted(build_models(ARCHS["v1_5"], meta=True))
        ['text_encoder', 'unet', 'vae']
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from backbones._sd_text import CLIPTextEncoder, TextConfig

    with torch.device("meta" if meta else "cpu"):
        return {"unet": UNet2DConditionModel.from_config(dict(arch["unet"])),
                "vae": AutoencoderKL.from_config(dict(arch["vae"])),
                "text_encoder": CLIPTextEncoder(TextConfig.from_dict(arch["text_encoder"]))}


def _weights(tag: str, repo: str, file: str, license_: str, what: str) -> Weights:
    return Weights(tag=tag, url=(f"{_HF}{repo}/resolve/main/{file}",), domain="laion", license=license_,
                   arch=copy.deepcopy(dict(ARCHS[tag])), description=f"{what}; diffusers folder: {_HF}{repo}")


@register_backbone("sd", "stable_diffusion")
class StableDiffusion(Backbone):
    """Up-block activations of a Stable Diffusion UNet at several noise levels.

    ``checkpoint`` is a diffusers folder or one original-layout ``.safetensors`` file (pickles refused);
    ``sha256`` the digest it must have (a file's sha256, or a folder's :func:`folder_digest`); ``arch`` an
    architecture name (``v1_5``, ``v2_1``, ``tiny``) or dict for a random-init model; ``image_size`` the
    square input (default: the model's training size, 512 / 768).

    Example:
        >>> import bench
        >>> bench.create_backbone("sd.v2_1", pretrained=False, device="meta").num_features
        1920
    """

    weights = {
        # sha256 not known to us: recorded on first download (bench.hub) and checked from then on.
        "v1_5": _weights("v1_5", "stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors",
                         "CreativeML OpenRAIL-M", "Stable Diffusion 1.5 (LAION-2B-en / LAION-Aesthetics, 512 px)"),
        "v2_1": _weights("v2_1", "stabilityai/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors",
                         "CreativeML Open RAIL++-M", "Stable Diffusion 2.1 (LAION-5B subset, 768 px, v-prediction)"),
    }
    default_tag = "v1_5"
    variant_arg = "arch"  # sd:tiny
    tiny = {"pretrained": False, "arch": "tiny", "blocks": (0, 1), "steps": (50, 250), "ensemble_size": 2}

    def __init__(self, *, tag: str | None = None, pretrained: bool = True, device: str = "cpu",
                 blocks: Sequence[int] = (1, 2), steps: Sequence[int] = (261,), prompt: str = "",
                 ensemble_size: int = 1, seed: int = 0, image_size: int | None = None,
                 checkpoint: str | Path | None = None, sha256: str = "",
                 arch: str | Mapping[str, Any] | None = None, fp16: bool = False) -> None:
        super().__init__(tag=tag, pretrained=pretrained, device=device)
        import torch

        from backbones import _sd_files as files

        path = Path(checkpoint) if checkpoint is not None else None
        if path is not None:
            if not path.exists():
                raise CheckpointError(f"sd checkpoint not found: {path}")
            if not path.is_dir():
                files.refuse_pickle(path)
            if tag is None:
                self.tag = None  # a user's own weights: no tag
        if arch is not None and path is not None and path.is_dir():
            raise BenchError("sd: give arch or a diffusers folder, not both (the folder's configs are its arch)")
        if isinstance(arch, str) and arch not in ARCHS:
            raise BenchError(f"sd has no arch {arch!r} (known: {', '.join(ARCHS)})")
        if arch is not None and pretrained and path is None:
            raise BenchError("sd: arch without weights is a random model; pass --pretrained false, or --weights")
        folder = path if path is not None and path.is_dir() else None
        self.arch = copy.deepcopy(dict(files.folder_arch(folder) if folder is not None else
                                       ARCHS[arch] if isinstance(arch, str) else
                                       arch if arch is not None else self.weights[self.tag or self.default_tag].arch))
        self._configure(blocks, steps, ensemble_size, image_size, prompt, fp16, seed)
        self.prompt = prompt
        self._set_noise(seed)
        from backbones._sd_text import prompt_ids

        # Tokenised now: a prompt that cannot be tokenised fails before any weights are read.
        length = int(self.arch["text_encoder"].get("max_position_embeddings", 77))
        self._prompt_ids = prompt_ids(prompt, self.arch["tokens"], length, folder / "tokenizer" if folder else None)
        if str(device) == "meta":  # feature_info and config only; nothing built
            return
        expected = str(sha256 or "").lower()
        if expected and (path is None or not pretrained):
            raise BenchError("sd sha256 checks a user's weights: give it with checkpoint (--weights)")
        if pretrained and path is None:
            from bench.hub import fetch_weights

            path = fetch_weights(self.weights_entry, module_file=__file__, name=f"sd.{self.tag}")
        load = path if pretrained else None
        folder_files = files.folder_files(path) if load is not None and path.is_dir() else None
        if load is not None:
            from bench.hub import sha256_file

            self._weights_sha256 = files.folder_digest(folder_files) if folder_files else sha256_file(path)
            if expected and self._weights_sha256 != expected:
                raise CheckpointError(f"sd weights {path} have sha256 {self._weights_sha256}, expected {expected}")
        # A random-init control never reads a tensor from a file; seeded so its features are reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            models = build_models(self.arch, meta=load is not None)
        if folder_files:
            files.load_folder(models, folder_files)
        elif load is not None:
            files.load_single_file(models, self.arch, load)
        self._finish(models, device)

    def _configure(self, blocks: Any, steps: Any, ensemble_size: Any, image_size: Any, prompt: Any, fp16: Any,
                   seed: Any) -> None:
        """Validate the settings against the architecture (before any weights are touched)."""
        unet, vae = self.arch["unet"], self.arch["vae"]
        self._maps = unet_maps(unet, vae)
        blocks = [blocks] if isinstance(blocks, int) else blocks
        steps = [steps] if isinstance(steps, int) else steps
        self.blocks = tuple(sorted(validate_indices(blocks, limit=len(self._maps), owner="sd", what="blocks")))
        limit = int(self.arch["scheduler"].get("num_train_timesteps", 1000))
        self.steps = tuple(validate_indices(steps, limit=limit, owner="sd", what="steps"))
        if isinstance(ensemble_size, bool) or not isinstance(ensemble_size, int) or ensemble_size < 1:
            raise BenchError(f"sd ensemble_size must be a positive integer, got {ensemble_size!r}")
        if not isinstance(prompt, str):
            raise BenchError(f"sd prompt must be a string, got {prompt!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BenchError(f"sd seed must be an integer, got {seed!r}")
        self.ensemble_size = ensemble_size
        self._latent_stride = 2 ** (len(vae["block_out_channels"]) - 1)
        multiple = self._latent_stride * 2 ** (len(unet["block_out_channels"]) - 1)
        size = int(unet["sample_size"]) * self._latent_stride if image_size is None else image_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % multiple:
            raise BenchError(f"sd image_size must be a positive multiple of {multiple}, got {image_size!r}")
        self.image_size = size
        if not isinstance(fp16, bool):
            raise BenchError(f"sd fp16 must be true or false, got {fp16!r}")
        if fp16 and not str(self.device).startswith(("cuda", "meta")):
            raise BenchError(f"sd fp16 needs a CUDA device, got device {self.device!r}")
        self.fp16 = fp16

    def _set_noise(self, seed: int) -> None:
        import torch

        # Drawn on CPU, so the values do not depend on the device; one draw per ensemble member.
        side = self.image_size // self._latent_stride
        size = (self.ensemble_size, int(self.arch["unet"].get("in_channels", 4)), side, side)
        self.seed = seed
        self.noise = torch.randn(size, generator=torch.Generator("cpu").manual_seed(seed))

    def _finish(self, models: dict[str, Any], device: str) -> None:
        """Embed the prompt once, drop what features never use, move to the device."""
        import torch
        from diffusers import DDPMScheduler

        with torch.no_grad():  # [1, L, D], the only use of CLIP
            self.text_embedding = models["text_encoder"].eval()(torch.tensor([self._prompt_ids])).to(device)
        vae, unet = models["vae"], models["unet"]
        del vae.decoder, vae.post_quant_conv  # encoding only
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.unet = unet.to(device).eval().requires_grad_(False)
        if self.fp16:
            self.unet.half()
            self.text_embedding = self.text_embedding.half()
        scheduler = DDPMScheduler.from_config({k: v for k, v in self.arch["scheduler"].items()
                                               if k in ("num_train_timesteps", "beta_start", "beta_end",
                                                        "beta_schedule", "trained_betas")})
        self._alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        self.noise = self.noise.to(device)

    @property
    def input_size(self) -> int:
        """The square size images are resized to (``image_size``)."""
        return self.image_size

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return [FeatureInfo(name=f"t{t}.up{b}", channels=self._maps[b][0], stride=self._maps[b][1])
                for t in self.steps for b in self.blocks]

    def preprocess(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 [B, 3, H, W] -> float32 in [-1, 1] at ``image_size`` x ``image_size`` (bilinear, antialiased).

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("sd", **StableDiffusion.tiny)
            >>> bb.preprocess(torch.full((1, 3, 48, 80), 255, dtype=torch.uint8)).shape
            torch.Size([1, 3, 64, 64])
        """
        import torch

        if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise BenchError(f"sd expects uint8 images [B, 3, H, W], got {images.dtype} {list(images.shape)}")
        x = images.to(device=self.device, dtype=torch.float32) / 127.5 - 1
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = torch.nn.functional.interpolate(x, size=(self.image_size,) * 2, mode="bilinear",
                                                align_corners=False, antialias=True).clamp(-1, 1)
        return x

    def forward_features(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """x in [-1, 1], [B, 3, S, S] -> step-major list of [B, C, S/stride, S/stride] float32 maps.

        All steps of the batch share one UNet pass per noise draw; hooks capture the up-blocks and the
        pass stops after the deepest requested one.

        Example:
            >>> import torch, bench
            >>> bb = bench.create_backbone("sd", **StableDiffusion.tiny)
            >>> len(bb.forward_features(torch.zeros(2, 3, 64, 64)))
            4
        """
        import torch

        if x.dim() != 4 or tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise BenchError(f"sd expects inputs [B, 3, {self.image_size}, {self.image_size}], got {list(x.shape)}")
        batch, n_steps = x.shape[0], len(self.steps)
        with torch.no_grad():
            latents = self.vae.encode(x.to(self.device, torch.float32)).latent_dist.mean
            latents = latents * float(self.vae.config.scaling_factor)
            ac = self._alphas_cumprod[list(self.steps)].to(self.device)
            a = ac.sqrt().float().view(-1, 1, 1, 1, 1)
            s = (1 - ac).sqrt().float().view(-1, 1, 1, 1, 1)
            t = torch.tensor(self.steps, device=self.device).repeat_interleave(batch)
            dtype = torch.float16 if self.fp16 else torch.float32
            text = self.text_embedding.expand(n_steps * batch, -1, -1)
            sums: dict[int, torch.Tensor] = {}
            for eps in self.noise:
                noisy = (a * latents.unsqueeze(0) + s * eps).flatten(0, 1)  # [steps * B, 4, h, w]
                for b, out in self._run_unet(noisy.to(dtype), t, text).items():
                    sums[b] = out.float() + sums[b] if b in sums else out.float()
        n = self.ensemble_size
        return [(sums[b][i * batch:(i + 1) * batch] / n) for i in range(n_steps) for b in self.blocks]

    def _run_unet(self, sample: "torch.Tensor", t: "torch.Tensor", text: "torch.Tensor") -> dict[int, "torch.Tensor"]:
        """The requested up-block outputs of one UNet pass, which ends after the deepest of them."""
        captured: dict[int, torch.Tensor] = {}
        deepest = max(self.blocks)

        def hook(index: int):
            def keep(_module: Any, _inputs: Any, output: Any) -> None:
                captured[index] = output[0] if isinstance(output, tuple) else output
                if index == deepest:
                    raise _Done  # nothing after this block is used
            return keep

        handles = [self.unet.up_blocks[b].register_forward_hook(hook(b)) for b in self.blocks]
        try:
            self.unet(sample, t, encoder_hidden_states=text)
        except _Done:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    def config(self) -> dict[str, Any]:
        """Base config plus blocks, steps, prompt, ensemble size, noise seed, image size, arch and fp16.

        Example:
            >>> import bench
            >>> bench.create_backbone("sd", pretrained=False, device="meta").config()["steps"]
            [261]
        """
        cfg = super().config()
        cfg.update({"blocks": list(self.blocks), "steps": list(self.steps), "prompt": self.prompt,
                    "ensemble_size": self.ensemble_size, "seed": self.seed, "image_size": self.image_size,
                    "arch": self.arch, "fp16": self.fp16})
        return cfg


class _Done(Exception):
    """Raised by the hook of the deepest requested up-block: the rest of the UNet is not needed."""
