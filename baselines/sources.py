"""Where synthetic images and their interpreter features come from: DatasetDDPM and DatasetGAN.

A source knows three things (baselines spec §3):

- its identity (``config()``: generator architecture, weights sha256, sampler or truncation), part of
  the set key;
- the interpreter's training data: the cached native maps and training labels of a few annotated
  images, in the same feature space as the generated images (``interpreter_key()`` is cheap and
  says what they are; ``interpreter_data()`` extracts them);
- ``generate(count, generator) -> (x, maps)``: ``count`` samples as float images in [-1, 1] and
  their native feature maps ``[count, C, h, w]``, every random number from ``generator``.

DatasetDDPM: images sampled from the ADM (ancestral by default, DDIM or respaced as options, D4);
features are the ``ddpm`` backbone's (blocks 5,6,7,8,12 at t = 50,150,250) of the FLOAT sample
clamped to [-1, 1] (D17, official) or of the stored uint8 image (``label_input="quantised"``). The
interpreter is trained on the labelled images of the run's split through :mod:`bench.runner`, so its
features, cache and ensemble are exactly a ``bench run``'s.

DatasetGAN: z ~ N(0, I) from ``generator``, mapped and truncated (psi 0.7 on the first 7 W+ rows
towards the generator's tracked mean ``w_avg``, D15), synthesised with noise 'const' (D14); features
are the const + every SynthesisLayer output. Its interpreter is trained on annotated GENERATED
samples (a folder of ``NAME.npy`` label maps with ``NAME.latent.npy`` W+ codes ``[num_ws, w_dim]``),
since only they have features in the generator's space (the paper's annotated GAN samples were not
released).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.cards import DatasetCard, get_card
from bench.errors import BenchError
from bench.fingerprint import file_sha256


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float images ``[B, 3, H, W]`` in [-1, 1] -> uint8 ``[B, H, W, 3]`` = floor(clamp((x + 1) * 127.5, 0, 255)).

    Example:
        >>> to_uint8(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)).tolist()
        [[[[0, 127, 255]]]]
    """
    return ((x.detach().float().cpu() + 1) * 127.5).clamp(0, 255).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass
class InterpreterData:
    """What an interpreter trains on: cached maps (by id) and training labels (small classes ignored)."""

    store: Any  # bench.features.FeatureStore
    ids: list[str]
    labels: list[np.ndarray]


class DDPMSource:
    """DatasetDDPM: samples of the run's ADM, labelled through its own ``ddpm`` features."""

    method = "datasetddpm"

    def __init__(self, spec: Any) -> None:
        from backbones._diffusion_sampling import SamplerConfig
        from bench.runner import RunSpec, plan

        if spec.label_input not in ("float", "quantised"):
            raise BenchError(f"label_input must be 'float' (official) or 'quantised', got {spec.label_input!r}")
        self.spec = spec
        self.sampler = SamplerConfig(kind=spec.sampler, steps=spec.sample_steps, eta=spec.eta)
        self.run_spec = RunSpec(backbone=spec.backbone, dataset=spec.dataset, seed=spec.seed,
                                backbone_kwargs=dict(spec.backbone_kwargs), device=spec.device,
                                max_memory_gb=spec.max_memory_gb, cache=spec.cache, progress=spec.progress,
                                members=spec.members, out=Path("unused"))
        self.plan = plan(self.run_spec)  # the split, every file checked, the backbone built: no long work
        self.backbone = self.plan.backbone
        if not hasattr(self.backbone, "model") or not hasattr(self.backbone, "flags"):
            raise BenchError(f"datasetddpm needs a diffusion backbone with a sampler (ddpm), got {spec.backbone!r}")
        if self.sampler.steps is not None and self.sampler.steps > self.backbone.flags.diffusion_steps:
            raise BenchError(f"--sample-steps {self.sampler.steps} is more than the model's "
                             f"{self.backbone.flags.diffusion_steps} diffusion steps")
        self.card: DatasetCard = self.plan.card
        self.image_size = int(self.backbone.input_size)
        self.weights_source = self.plan.weights_source

    def config(self) -> dict:
        return {"method": self.method, "backbone": self.plan.backbone_config, "sampler": self.sampler.to_dict(),
                "label_input": self.spec.label_input, "cache_dtype": self.run_spec.cache_dtype}

    def interpreter_key(self) -> dict:
        parts = dict(self.plan.key_parts)
        parts["files"] = {"train": parts["files"]["train"]}  # the test images do not change the interpreter
        return parts

    def interpreter_data(self) -> InterpreterData:
        from bench.labels import load_label, training_label
        from bench.runner import extract

        backbone = self.backbone
        store = extract(self.plan)  # cached like a bench run's; it drops the plan's model reference
        self.plan.backbone = backbone
        p = self.plan
        labels = [training_label(load_label(s, p.card, self.run_spec.fit), p.card) for s in p.train]
        return InterpreterData(store, [p.content[s.id] for s in p.train], labels)

    def member_seeds(self) -> list[int]:
        return list(self.plan.key_parts["member_seeds"])

    @torch.no_grad()
    def generate(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
        from backbones._diffusion_sampling import sample_images

        bb = self.backbone
        x = sample_images(bb.model, bb.flags, count, generator=generator, config=self.sampler, device=bb.device)
        x = x.clamp(-1, 1)
        if self.spec.label_input == "quantised":  # label what is stored, not the float sample
            x_in = bb.preprocess(torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).contiguous())
        else:
            x_in = x
        return x, bb.forward_features(x_in)


class GANSource:
    """DatasetGAN: StyleGAN2 samples, labelled through the generator's own synthesis features."""

    method = "datasetgan"

    def __init__(self, spec: Any) -> None:
        from backbones._stylegan2 import Generator, load_generator

        self.spec = spec
        self.card = get_card(spec.dataset)
        if spec.annotated is None:
            raise BenchError("datasetgan needs --annotated DIR: annotated generated samples (NAME.npy labels with "
                             "NAME.latent.npy W+ codes) to train its interpreter on")
        self.annotated = Path(spec.annotated)
        if not self.annotated.is_dir():
            raise BenchError(f"--annotated {self.annotated}: no such folder")
        if spec.generator is not None:
            path = Path(spec.generator)
            if not path.is_file():
                raise BenchError(f"--weights {path}: no such StyleGAN2-ADA pickle")
            self.G = load_generator(path, device=spec.device)
            self.weights_sha256, self.init_kwargs = file_sha256(path), {"file": path.name}
            self.weights_source = "user"
        else:  # random-init generator: a pipeline test, never a number to compare
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                self.G = Generator(**spec.generator_kwargs).to(spec.device).eval()
            self.weights_sha256, self.init_kwargs = "", dict(spec.generator_kwargs)
            self.weights_source = "none"
        self.G.requires_grad_(False)
        self.image_size = int(self.G.img_resolution)
        self.num_ws = int(self.G.num_ws)
        self.w_dim = int(self.G.w_dim)
        self.samples = self._annotated_samples()

    def _annotated_samples(self) -> list[tuple[str, Path, Path]]:
        labels = sorted(p for p in self.annotated.glob("*.npy") if not p.name.endswith(".latent.npy"))
        if not labels:
            raise BenchError(f"--annotated {self.annotated}: no NAME.npy label maps")
        out = []
        for label in labels:
            latent = label.with_name(label.name[:-4] + ".latent.npy")
            if not latent.is_file():
                raise BenchError(f"{label}: no W+ code {latent.name} next to it")
            out.append((hashlib.sha256((file_sha256(latent) + file_sha256(label)).encode()).hexdigest(), latent, label))
        return out

    def _load_latent(self, path: Path) -> torch.Tensor:
        w = np.load(path, allow_pickle=False)
        w = np.broadcast_to(w, (self.num_ws, self.w_dim)) if w.shape == (self.w_dim,) else w
        if w.shape != (self.num_ws, self.w_dim):
            raise BenchError(f"{path}: a W+ code of shape [{self.num_ws}, {self.w_dim}] (or [{self.w_dim}]) "
                             f"expected, got {list(w.shape)}")
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))

    def _load_label(self, path: Path) -> np.ndarray:
        from bench.labels import training_label

        label = np.load(path, allow_pickle=False)
        size = (self.image_size, self.image_size)
        if label.shape != size:
            raise BenchError(f"{path}: label of shape {list(label.shape)}, expected {list(size)}")
        bad = ~np.isin(label, [*range(self.card.num_classes), self.card.ignore_label])
        if bad.any():
            raise BenchError(f"{path}: label id {int(label[bad].flat[0])} is not a class of {self.card.name}")
        return training_label(label.astype(np.uint8), self.card)

    def config(self) -> dict:
        return {"method": self.method, "generator": {"weights_sha256": self.weights_sha256, **self.init_kwargs},
                "truncation_psi": self.spec.truncation_psi, "truncation_cutoff": self.spec.truncation_cutoff,
                "truncation_mean": "w_avg", "noise_mode": "const", "features": "const + all SynthesisLayer outputs"}

    def interpreter_key(self) -> dict:
        from bench.probe import TrainConfig
        from dataclasses import asdict

        return {"annotated": [s[0] for s in self.samples], "generator": self.config()["generator"],
                "probe": asdict(TrainConfig(members=self.spec.members)), "member_seeds": self.member_seeds(),
                "card": self.card.name}

    def member_seeds(self) -> list[int]:
        from bench.seeding import derive_seed

        return [derive_seed(self.spec.seed, "member", m) for m in range(self.spec.members)]

    def interpreter_data(self) -> InterpreterData:
        from bench.features import FeatureStore
        from bench.hub import cache_dir

        cache = Path(self.spec.cache) if self.spec.cache else cache_dir("features")
        store = FeatureStore(cache, {"backbone": "stylegan2", **self.config()}, self.image_size)
        latents = {sid: latent for sid, latent, _ in self.samples}
        store.ensure(list(latents), lambda ids: torch.stack([self._load_latent(latents[i]) for i in ids]),
                     lambda ws: self.G.synthesis(ws.to(self.spec.device), noise_mode="const")[1],
                     progress=self.spec.progress, desc="annotated GAN features")
        return InterpreterData(store, list(latents), [self._load_label(label) for _, _, label in self.samples])

    @torch.no_grad()
    def generate(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = torch.randn(count, self.G.z_dim, generator=generator).to(self.spec.device)
        ws = self.G.mapping(z, truncation_psi=self.spec.truncation_psi, truncation_cutoff=self.spec.truncation_cutoff)
        img, maps = self.G.synthesis(ws, noise_mode="const")
        return img.clamp(-1, 1), maps


METHODS = {"datasetddpm": DDPMSource, "datasetgan": GANSource}
