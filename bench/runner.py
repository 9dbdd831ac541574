"""One benchmark run: (backbone, weights, dataset, split seed) -> a result JSON, in six stages.

    plan     card, split, every file read and checked, backbone built, run key  (no long work yet)
    extract  native maps of every image into the feature store (cached, so a killed run resumes)
    train    the training pixel index and the ensemble
    predict  every test image, chunk by chunk: majority vote and JS uncertainty
    score    confusion matrix -> both mIoU variants and per-class IoU
    write    the result JSON, atomically

The **run key** (:func:`plan`) is the one place that says what produced a number: a hash of the
protocol version, the dataset card and the sha256 of every file, the split's file lists, the
backbone's resolved config (weights sha256, layers, steps, noise, init seed), the feature settings
and the probe config. A result is reused only under an equal key (:func:`bench.results.existing_result`).

The seed ``s`` drives everything in a run, each through its own sub-stream (:mod:`bench.seeding`):
the split, random-init weights (``init``), each ensemble member (``member``/m). Plugins that draw
randomness of their own (the diffusion noise) take a ``seed`` argument and get ``s`` itself, so
that seed 0 reproduces the official CPU noise recipe.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import features, metrics, probe
from bench.cards import DatasetCard, get_card
from bench.errors import BenchError
from bench.fingerprint import digest, file_sha256
from bench.images import check_fit
from bench.labels import load_label, training_label
from bench.registry import check_kwargs, resolve_name, split_name
from bench.results import SCHEMA, PeakMemory, existing_result, provenance, run_path, write_json_atomic
from bench.samples import Sample, dataset_root, list_samples, load_image, validate_samples
from bench.seeding import derive_seed
from bench.splits import SPLIT_VERSION, make_split

GiB = 1024**3
#: the evaluation protocol (probe, vote, metrics, sampling); bump when a change alters results
PROTOCOL_VERSION = "bench.protocol/2"


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
    fit: str = "stretch"  # how non-square images become the model's square input (bench.images)
    cache_dtype: str = "float16"  # feature cache precision: float16 (default) or float32
    overwrite: bool = False  # replace a result of another configuration under the same label
    probe_precision: str = "auto"  # first-layer precision of the probe (bench.probe_precision); resolved in plan
    save_masks: int = 0  # draw the first n test images' masks (bench.analyses.masks); output only, not in the key

    @property
    def label(self) -> str:
        """The report row: the backbone name, ``-random`` for a random-init control."""
        base = self.name or self.backbone
        return base if self.pretrained else f"{base}-random"


@dataclass
class Plan:
    """A run resolved before any long work: its data, its backbone and its key."""

    spec: RunSpec
    card: DatasetCard
    train: list[Sample]
    test: list[Sample]
    device: str
    backbone: Any
    backbone_config: dict
    weights_source: str  # "official" (the tag's own file), "user" (--weights), "none" (random init)
    content: dict[str, str]  # sample id -> sha256 of its image file (the feature-cache image id)
    key_parts: dict
    run_key: str
    config_key: str  # the run key without what the seed changes: results of one config share it
    out_path: Path


def _pick_tag(cls: type, tag: str | None, card: DatasetCard, user_weights: bool, pretrained: bool) -> str | None:
    """The user's tag, else (official weights only) the one whose domain matches the dataset.

    With no match, the default tag is taken only where it is generic (its domain is no dataset's,
    e.g. ImageNet or LVD-142M weights) or for a random-init control (which reads its architecture
    only). Domain-specific weights of another domain (a bedroom model on cats) are refused with one
    line naming the tags, instead of running silently.
    """
    if tag is not None or not cls.weights or user_weights:
        return tag
    for name, w in cls.weights.items():
        if w.domain and w.domain == card.domain:
            return name
    default = cls.weights.get(cls.default_tag) if cls.default_tag else None
    from bench.cards import list_cards

    dataset_domains = {c.domain for c in list_cards() if c.domain}
    if not pretrained or default is None or default.domain not in dataset_domains:
        return cls.default_tag
    tags = ", ".join(f"{cls.name}.{t}" for t in cls.weights)
    raise BenchError(f"{cls.name} has no official weights for the domain {card.domain or '(none)'!r} of dataset "
                     f"{card.name!r}; name one of {tags} explicitly, or pass --weights")


def build_backbone(spec: RunSpec, card: DatasetCard, device: str):
    """Create the run's backbone: tag by dataset domain, the run seed for plugin randomness.

    A random-init control (``pretrained=False``) never loads weights; a plugin may read the
    architecture stored in a ``checkpoint`` file, nothing else.

    Example:
        >>> bb = build_backbone(RunSpec("pixels", "demo"), get_card("demo"), "cpu")
        >>> bb.name
        'pixels'
    """
    cls, tag, extra = resolve_name(spec.backbone)
    kwargs = {**spec.backbone_kwargs, **extra}
    tag = _pick_tag(cls, tag, card, user_weights=kwargs.get("checkpoint") is not None, pretrained=spec.pretrained)
    if "seed" in inspect.signature(cls.__init__).parameters and "seed" not in kwargs:
        kwargs["seed"] = spec.seed
    if tag is not None:
        kwargs["tag"] = tag
    check_kwargs(cls, kwargs)
    # Random-init controls must be reproducible: seed the global RNG that nn.Module init uses.
    torch.manual_seed(derive_seed(spec.seed, "init"))
    return cls(pretrained=spec.pretrained, device=device, **kwargs)


def _card_fields(card: DatasetCard) -> dict:
    """The card's content (not where it was read from): part of the run key."""
    data = card.to_json()
    data.pop("path", None)
    return data


def plan(spec: RunSpec) -> Plan:
    """Stage 1: resolve and check everything, build the backbone, compute the run key.

    Every image and label of the split is read here, so a broken file fails in seconds.

    Example:
        >>> p = plan(RunSpec("pixels", "demo", seed=0, max_train=2, max_test=2, out=Path("/tmp/x")))
        >>> len(p.run_key), p.weights_source
        (16, 'none')
    """
    card = get_card(spec.dataset)
    check_fit(spec.fit)
    root = dataset_root(card)
    train, test = make_split(card, root, spec.seed if spec.split == "resplit" else None)
    train, test = train[: spec.max_train], test[: spec.max_test]
    validate_samples(train + test, card, spec.fit)
    pool = list_samples(card, root, "train") + list_samples(card, root, "test")
    files = {s.id: [file_sha256(s.image), file_sha256(s.label)] for s in pool}
    device = resolve_device(spec.device)
    backbone = build_backbone(spec, card, device)
    config = backbone.config()
    if not spec.pretrained:
        config["init_seed"] = derive_seed(spec.seed, "init")
    user_weights = spec.backbone_kwargs.get("checkpoint") is not None
    weights_source = "none" if not config.get("weights_sha256") else ("user" if user_weights else "official")
    from bench.probe_precision import resolve_precision

    # the resolved mode (never "auto") enters the key; fp32 is left out so fp32 keys are what they were
    precision = resolve_precision(spec.probe_precision, device, getattr(backbone, "num_features", None))
    probe_config = probe.config_key_parts(probe.TrainConfig(members=spec.members, precision=precision))
    member_seeds = [derive_seed(spec.seed, "member", m) for m in range(spec.members)]
    settings = {
        "protocol": PROTOCOL_VERSION,
        "dataset": {"card": _card_fields(card), "content": digest(files, 32)},
        "split": {"kind": spec.split, "version": SPLIT_VERSION, "max_train": spec.max_train, "max_test": spec.max_test},
        "backbone": {"name": spec.backbone, "pretrained": spec.pretrained,
                     "weights_sha256": config.get("weights_sha256", ""),
                     "options": {k: v for k, v in spec.backbone_kwargs.items() if k != "checkpoint"}},
        "features": {"fit": spec.fit, "cache_dtype": spec.cache_dtype, "image_size": card.resolution},
        "probe": probe_config,
    }
    key_parts = {
        **settings,
        "seed": spec.seed if spec.split == "resplit" else None,
        "files": {"train": [[s.id, *files[s.id]] for s in train], "test": [[s.id, *files[s.id]] for s in test]},
        "backbone_config": config,
        "member_seeds": member_seeds,
    }
    out_path = run_path(spec.out, card.name, spec.label, spec.seed if spec.split == "resplit" else "released")
    return Plan(spec=spec, card=card, train=train, test=test, device=device, backbone=backbone,
                backbone_config=config, weights_source=weights_source,
                content={s.id: files[s.id][0] for s in train + test}, key_parts=key_parts,
                run_key=digest(key_parts), config_key=digest(settings), out_path=out_path)


def extract(p: Plan) -> features.FeatureStore:
    """Stage 2: native maps of every train and test image into the feature store (skips cached ones)."""
    from bench.hub import cache_dir

    spec, card = p.spec, p.card
    store_config = {**p.backbone_config, "fit": spec.fit}
    cache = Path(spec.cache) if spec.cache else cache_dir("features")
    store = features.FeatureStore(cache, store_config, card.resolution, dtype=spec.cache_dtype)
    by_hash = {p.content[s.id]: s for s in p.train + p.test}

    def load(hashes: list[str]) -> torch.Tensor:
        arrays = [load_image(by_hash[h], card, spec.fit) for h in hashes]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    store.ensure([p.content[s.id] for s in p.train + p.test], load, p.backbone.extract,
                 batch_size=spec.extract_batch, progress=spec.progress, desc=f"{spec.label} features")
    p.backbone = None  # the later stages need no model: give its memory back
    return store


def train(p: Plan, store: features.FeatureStore) -> dict:
    """Stage 3: the training pixel index, the pixel source the memory budget allows, the ensemble."""
    spec, card = p.spec, p.card
    labels = (training_label(load_label(s, card, spec.fit), card) for s in p.train)
    config = probe.TrainConfig(members=spec.members, precision=p.key_parts["probe"].get("precision", "fp32"))
    return fit_probe(store, [p.content[s.id] for s in p.train], labels, card, seeds=p.key_parts["member_seeds"],
                     members=spec.members, max_memory_gb=spec.max_memory_gb, device=p.device, progress=spec.progress,
                     config=config)


def fit_probe(store: features.FeatureStore, ids: list[str], labels: Any, card: DatasetCard, *,
              seeds: list[int], members: int = 10, max_memory_gb: float = 4.0, device: str = "cpu",
              progress: bool = True, config: probe.TrainConfig | None = None) -> dict:
    """Train the ensemble on the cached maps of ``ids`` with their training labels (small classes already ignored).

    The pixel source is chosen by the memory budget: in RAM when the kept pixels fit in half of it,
    else streamed from the cache. Used by :func:`train` and by the synthetic-data baselines, which
    label generated images with an ensemble trained exactly as a run's.

    Example:
        >>> # fit_probe(store, ["<sha256>"], [label_array], get_card("demo"), seeds=[1, 2])["ensemble"]
    """
    budget = int(max_memory_gb * GiB)
    index = features.build_pixel_index(labels, card.ignore_label)
    dim = sum(int(m.shape[-1]) for m in store.load(ids[0], mmap=True))
    if features.dense_bytes(len(index.labels), dim) <= budget // 2:
        source: Any = features.DensePixels(store, ids, index)
        kind = "dense"
    else:
        source = features.StreamedPixels(store, ids, index, max_resident_bytes=budget // 4)
        kind = "streamed"
    # ``config`` (analyses: a capped or resized probe) replaces the official settings for ``members``
    ensemble, member_info = probe.train_ensemble(
        source, card.num_classes, seeds=seeds, config=config or probe.TrainConfig(members=members), device=device,
        progress=progress,
    )
    return {"ensemble": ensemble, "members": member_info, "pixel_source": kind, "dim": dim,
            "num_train_pixels": int(len(index.labels))}


def predict(p: Plan, store: features.FeatureStore, trained: dict,
            on_image: Any = None) -> tuple[metrics.ConfusionMatrix, list[float]]:
    """Stages 4-5: label every test pixel (chunked), vote, and fill the confusion matrix.

    ``on_image(index, sample, labels, js, gt)``, if given, sees each test image's vote and JS map
    (``--save-masks`` draws its panels from them; output only, no part of the run key).
    """
    from bench.progress import progress

    spec, card = p.spec, p.card
    cm = metrics.ConfusionMatrix(card.num_classes, card.ignore_label)
    uncertainties = []
    with progress(total=len(p.test), desc=f"{spec.label} predict", unit="img", enabled=spec.progress) as bar:
        for s in p.test:
            gt = load_label(s, card, spec.fit)
            labels, js = label_image(trained["ensemble"], store.load(p.content[s.id]), gt.shape,
                                     max_memory_gb=spec.max_memory_gb, device=p.device)
            cm.update(labels.numpy(), gt)
            uncertainties.append(probe.image_uncertainty(js))
            if on_image is not None:
                on_image(len(uncertainties) - 1, s, labels, js, gt)
            bar.update(1)
    return cm, uncertainties


def label_image(ensemble: probe.EnsembleMLP, maps: list[torch.Tensor], size: tuple[int, int], *,
                max_memory_gb: float = 4.0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Vote labels ``[H, W]`` and per-pixel JS ``[H*W]`` of one image from its channels-last native maps.

    Pixels go through the ensemble in chunks sized by the memory budget, so an image of any size
    never becomes one ``[H*W, d]`` matrix.

    Example:
        >>> ens = probe.EnsembleMLP(in_dim=2, num_classes=3, members=2).eval()
        >>> labels, js = label_image(ens, [torch.zeros(4, 4, 2)], (8, 8))
        >>> tuple(labels.shape), tuple(js.shape)
        ((8, 8), (64,))
    """
    height, width = (int(size[0]), int(size[1]))
    dim = sum(int(m.shape[-1]) for m in maps)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    chunk = max(1024, min(height * width, int(max_memory_gb * GiB) // 8 // max(1, dim * 4)))
    labels, js = probe.predict_chunked(
        ensemble, lambda sl: features.sample_maps(maps, ys[sl], xs[sl], (height, width)),
        height * width, chunk=chunk, device=device,
    )
    return labels.reshape(height, width), js


def score(p: Plan, cm: metrics.ConfusionMatrix) -> dict:
    """Stage 5: both mIoU variants and the per-class IoU over the classes the card counts."""
    card = p.card
    ids = list(card.miou_class_ids)
    return {
        "miou": {"official": cm.miou("official", ids), "standard": cm.miou("standard", ids)},
        "num_scored_pixels": int(cm.counts.sum()),  # ground-truth pixels seen, ignore label included
        "per_class_iou": {
            "class_ids": ids,
            "class_names": [card.classes[i] for i in ids],
            "official": [float(v) for v in cm.iou("official", ids)],
            "standard": [None if np.isnan(v) else float(v) for v in cm.iou("standard", ids)],
        },
    }


def run(spec: RunSpec) -> dict:
    """Run (or reuse, when a result with the same run key exists) one benchmark unit; returns its result.

    Example:
        >>> # bench.runner.run(RunSpec("pixels", "demo", seed=0, out=Path("/tmp/r")))["miou"]["official"]
    """
    t_start = time.time()
    p = plan(spec)
    found = existing_result(p.out_path, p.run_key, p.key_parts, overwrite=spec.overwrite)
    if found is not None:
        if spec.save_masks:
            import sys

            print(f"bench: note: {p.out_path} reused, so no masks were drawn (bench analyze masks draws them)",
                  file=sys.stderr)
        return found
    times = {}
    with PeakMemory(p.device) as peak:
        t0 = time.time()
        store = extract(p)
        times["extract"], t0 = time.time() - t0, time.time()
        trained = train(p, store)
        times["train"], t0 = time.time() - t0, time.time()
        masks = None
        if spec.save_masks:
            from bench.analyses.masks import MaskCollector

            masks = MaskCollector(spec.save_masks)
        cm, uncertainties = predict(p, store, trained, on_image=masks)
        times["predict"] = time.time() - t0
    times["total"] = time.time() - t_start
    result = {
        "schema": SCHEMA,
        "run_key": p.run_key,
        "config_key": p.config_key,
        "backbone": spec.label,
        "arch": split_name(spec.backbone)[0],
        "tag": p.backbone_config.get("tag"),
        "pretrained": spec.pretrained,
        "weights_source": p.weights_source,
        "dataset": p.card.name,
        "split": spec.split,
        "seed": spec.seed if spec.split == "resplit" else None,
        **score(p, cm),
        "mean_image_uncertainty": float(np.mean(uncertainties)) if uncertainties else None,
        "num_train_images": len(p.train),
        "num_test_images": len(p.test),
        "num_train_pixels": trained["num_train_pixels"],
        "feature_dim": trained["dim"],
        "geometry": {"fit": spec.fit, "model_input": p.card.resolution,
                     "scored_at": "label resolution for non-square images, else the model input"
                     if spec.fit == "stretch" else "the model input (central square crop)"},
        "config": {
            "backbone": p.backbone_config,
            "backbone_kwargs": spec.backbone_kwargs,
            "members": spec.members,
            "member_seeds": p.key_parts["member_seeds"],
            "probe": p.key_parts["probe"],
            "probe_precision": p.key_parts["probe"].get("precision", "fp32"),
            "pixel_source": trained["pixel_source"],
            "max_memory_gb": spec.max_memory_gb,
            "cache_dtype": spec.cache_dtype,
            "feature_cache": str(store.folder),
        },
        "key_parts": p.key_parts,
        "members": trained["members"],
        "provenance": {
            **provenance(p.device),
            "weights_sha256": p.backbone_config.get("weights_sha256", ""),
            "wall_time_s": times,
            "peak_rss_bytes": peak.rss_bytes,
            "peak_rss_method": peak.method,
            "peak_gpu_bytes": peak.gpu_bytes,
        },
        "files": {"train": [s.id for s in p.train], "test": [s.id for s in p.test]},
    }
    if masks is not None:  # before the result: a finished result implies its panels exist
        from bench.analyses.masks import run_folder

        masks.write(run_folder(spec.out, p.card.name, spec.label, result["seed"] if spec.split == "resplit" else "released"),
                    p.card, spec.fit, {"source": "bench run --save-masks", "run_key": p.run_key, "dataset": p.card.name,
                                       "seed": result["seed"], "backbone": spec.label, "miou": result["miou"],
                                       "backbone_config": p.backbone_config, "files": result["files"]},
                    f"{spec.label} on {p.card.name}, seed {result['seed']}: mIoU {100 * result['miou']['official']:.1f}"
                    " (official)", device=p.device)
    write_json_atomic(p.out_path, result)
    return result
