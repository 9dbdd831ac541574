"""One benchmark run: (backbone, weights, dataset, split seed) -> a result JSON.

The seed ``s`` drives everything in a run, each through its own sub-stream (``bench.data.derive_seed``):
the split permutation (``split``), random-init weights (``init``), each ensemble member's
initialisation and pixel order (``member``/m). Plugins that draw randomness of their own (the
diffusion noise) take a ``seed`` argument and get ``s`` itself, so that seed 0 reproduces the
official CPU noise recipe.

Steps: resolve the dataset and split -> extract native maps into the feature store (cached, so a
killed run resumes here) -> build the training pixel index -> train the ensemble -> predict the test
images in pixel chunks -> confusion matrix -> both mIoU variants -> atomic JSON.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench import data, features, metrics, probe
from bench.errors import BenchError
from bench.registry import resolve_name, split_name
from bench.results import SCHEMA, peak_rss_bytes, provenance, run_path, write_json_atomic

GiB = 1024**3


def resolve_device(device: str) -> str:
    """``auto`` -> cuda, then mps, then cpu; anything else is checked and returned.

    Example:
        >>> resolve_device("cpu")
        'cpu'
    """
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {device!r}: CUDA is not available on this machine (use auto or cpu)")
    if device not in {"cpu", "mps"} and not device.startswith("cuda"):
        raise BenchError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


@dataclass
class RunSpec:
    """Everything that defines one run.

    Example:
        >>> RunSpec(backbone="pixels", dataset="demo", seed=0).label
        'pixels'
    """

    backbone: str
    dataset: str
    seed: int = 0
    pretrained: bool = True
    split: str = "resplit"  # "resplit": pooled re-split from the seed; "released": the released folders
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    max_memory_gb: float = 4.0
    out: Path = Path("reports")
    cache: Path | None = None
    progress: bool = True
    extract_batch: int = 4
    members: int = 10
    name: str = ""  # row label override
    max_train: int | None = None  # keep the first n of the split (quick checks), None = all
    max_test: int | None = None

    @property
    def label(self) -> str:
        """The report row: the backbone name, ``-random`` for a random-init control."""
        base = self.name or self.backbone
        return base if self.pretrained else f"{base}-random"


def _pick_tag(cls: type, tag: str | None, domain: str) -> str | None:
    """The user's tag, else the one whose domain matches the dataset, else the plugin default."""
    if tag is not None or not cls.weights:
        return tag
    for name, w in cls.weights.items():
        if w.domain and w.domain == domain:
            return name
    return cls.default_tag


def build_backbone(spec: RunSpec, card: data.DatasetCard, device: str):
    """Create the run's backbone: tag by dataset domain, the run seed for plugin randomness.

    Example:
        >>> bb = build_backbone(RunSpec("pixels", "demo"), data.get_card("demo"), "cpu")
        >>> bb.name
        'pixels'
    """
    cls, tag, extra = resolve_name(spec.backbone)
    tag = _pick_tag(cls, tag, card.domain)
    kwargs = {**spec.backbone_kwargs, **extra}
    if "seed" in inspect.signature(cls.__init__).parameters and "seed" not in kwargs:
        kwargs["seed"] = spec.seed
    if tag is not None:
        kwargs["tag"] = tag
    # Random-init controls must be reproducible: seed the global RNG that nn.Module init uses.
    torch.manual_seed(data.derive_seed(spec.seed, "init"))
    return cls(pretrained=spec.pretrained, device=device, **kwargs)


def _load_images(card: data.DatasetCard, samples: dict[str, data.Sample]) -> Callable[[list[str]], torch.Tensor]:
    def load(ids: list[str]) -> torch.Tensor:
        arrays = [data.load_image(samples[i], card) for i in ids]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    return load


def run(spec: RunSpec) -> dict:
    """Run (or skip, when its result exists) one benchmark unit and return its result dict.

    Example:
        >>> # bench.runner.run(RunSpec("pixels", "demo", seed=0, out=Path("/tmp/r")))["miou"]["official"]
    """
    from bench.hub import bench_home

    card = data.get_card(spec.dataset)
    out_path = run_path(spec.out, card.name, spec.label, spec.seed if spec.split == "resplit" else "released")
    if out_path.exists():
        import json

        return json.loads(out_path.read_text())

    t_start = time.time()
    device = resolve_device(spec.device)
    budget = int(spec.max_memory_gb * GiB)
    root = data.dataset_root(card)
    train, test = data.make_split(card, root, spec.seed if spec.split == "resplit" else None)
    train, test = train[: spec.max_train], test[: spec.max_test]
    backbone = build_backbone(spec, card, device)

    store_config = backbone.config()
    if not spec.pretrained:
        store_config["init_seed"] = data.derive_seed(spec.seed, "init")
    cache = Path(spec.cache) if spec.cache else bench_home() / "features"
    store = features.FeatureStore(cache, store_config, card.resolution)
    key = {s.id: f"{card.name}/{s.id}" for s in train + test}
    by_key = {key[s.id]: s for s in train + test}

    t0 = time.time()
    store.ensure(
        [key[s.id] for s in train + test],
        _load_images(card, by_key),
        backbone.extract,
        batch_size=spec.extract_batch,
        progress=spec.progress,
        desc=f"{spec.label} features",
    )
    t_extract = time.time() - t0
    del backbone  # the probe stage needs no model: give its memory back

    t0 = time.time()
    train_ids = [key[s.id] for s in train]
    index = features.build_pixel_index(
        (data.training_label(data.load_label(s, card), card) for s in train), card.ignore_label
    )
    dim = sum(int(m.shape[-1]) for m in store.load(train_ids[0], mmap=True))
    if features.dense_bytes(len(index.labels), dim) <= budget // 2:
        source: Any = features.DensePixels(store, train_ids, index)
        source_kind = "dense"
    else:
        source = features.StreamedPixels(store, train_ids, index, max_resident_bytes=budget // 4)
        source_kind = "streamed"
    seeds = [data.derive_seed(spec.seed, "member", m) for m in range(spec.members)]
    ensemble, members_info = probe.train_ensemble(
        source, card.num_classes, seeds=seeds, config=probe.TrainConfig(members=spec.members),
        device=device, progress=spec.progress,
    )
    del source
    t_train = time.time() - t0

    t0 = time.time()
    cm = metrics.ConfusionMatrix(card.num_classes, card.ignore_label)
    size = card.resolution
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    chunk = max(1024, min(size * size, budget // 8 // max(1, dim * 4)))
    uncertainties = []
    from tqdm.auto import tqdm

    for s in tqdm(test, desc=f"{spec.label} predict", unit="img", disable=not spec.progress):
        maps = store.load(key[s.id])
        labels, js = probe.predict_chunked(
            ensemble, lambda sl: features.sample_maps(maps, ys[sl], xs[sl], size), size * size,
            chunk=chunk, device=device,
        )
        cm.update(labels.reshape(size, size).numpy(), data.load_label(s, card))
        uncertainties.append(probe.image_uncertainty(js))
    t_predict = time.time() - t0

    ids = list(card.miou_class_ids)
    result = {
        "schema": SCHEMA,
        "backbone": spec.label,
        "arch": split_name(spec.backbone)[0],
        "tag": store_config.get("tag"),
        "pretrained": spec.pretrained,
        "dataset": card.name,
        "split": spec.split,
        "seed": spec.seed,
        "miou": {"official": cm.miou("official", ids), "standard": cm.miou("standard", ids)},
        "per_class_iou": {
            "class_ids": ids,
            "class_names": [card.classes[i] for i in ids],
            "official": [float(v) for v in cm.iou("official", ids)],
            "standard": [None if np.isnan(v) else float(v) for v in cm.iou("standard", ids)],
        },
        "mean_image_uncertainty": float(np.mean(uncertainties)) if uncertainties else None,
        "num_train_images": len(train),
        "num_test_images": len(test),
        "num_train_pixels": int(len(index.labels)),
        "feature_dim": dim,
        "config": {
            "backbone": store_config,
            "backbone_kwargs": spec.backbone_kwargs,
            "members": spec.members,
            "member_seeds": seeds,
            "probe": vars(probe.TrainConfig(members=spec.members)),
            "pixel_source": source_kind,
            "max_memory_gb": spec.max_memory_gb,
            "feature_cache": str(store.folder),
        },
        "members": members_info,
        "provenance": {
            **provenance(device),
            "weights_sha256": store_config.get("weights_sha256", ""),
            "wall_time_s": {
                "total": time.time() - t_start, "extract": t_extract, "train": t_train, "predict": t_predict,
            },
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0,
        },
        "files": {"train": [s.id for s in train], "test": [s.id for s in test]},
    }
    write_json_atomic(out_path, result)
    return result
