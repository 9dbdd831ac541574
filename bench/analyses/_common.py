"""Plumbing every analysis shares: one run planned and its features extracted ONCE into the cache,
subsets of the cached maps, probes trained and scored on them, the output folder rule and meta.json.

An analysis is a variation on a run (:mod:`bench.runner`), so it reuses the run's stages instead of
copying them: :func:`prepare` = ``plan`` + ``extract`` (the feature cache is keyed by the backbone's
resolved config and each image's sha256, so a second call computes nothing), :func:`select_maps`
gives a view of some of the cached maps that the probe and the predictor read like a whole store,
:func:`train_probe` / :func:`evaluate` are ``fit_probe`` / ``predict`` + ``score`` on such a view.

Outputs live in ``<out>/analyses/<dataset>/<NAME>/`` (:func:`output_folder`), with the figures'
CSV + PNG (:func:`bench.figures.save_figure`) and a ``meta.json`` (:func:`write_meta`) saying what
produced them (:func:`run_meta`: dataset content, split files, backbone config, run key, settings).

Example:
    >>> from bench.runner import RunSpec
    >>> prep = prepare(RunSpec("pixels", "demo", seed=0, max_train=2, max_test=1, progress=False))  # doctest: +SKIP
    >>> view = select_maps(prep.store, [0])                                                          # doctest: +SKIP
    >>> evaluate(prep, train_probe(prep, view), view)["miou"]["official"]                            # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from bench.errors import BenchError

#: bump when an analysis' numbers would change for the same inputs (recorded in every meta.json)
ANALYSIS_VERSION = "bench.analyses/1"


def add_run_arguments(parser: argparse.ArgumentParser, *, backbone: str = "ddpm", seeds: str = "0",
                      members: int = 10) -> None:
    """The options every analysis takes to define its run(s): backbone, dataset, seeds, probe size, out.

    Example:
        >>> p = argparse.ArgumentParser(); add_run_arguments(p)
        >>> p.parse_args([]).seeds, p.parse_args(["--set", "blocks=6"]).set
        ([0], ['blocks=6'])
    """
    from bench.cli import _bool, _positive_float, _positive_int, _seeds

    parser.add_argument("--backbone", default=backbone, help=f"name or name.tag (default {backbone})")
    parser.add_argument("--dataset", default="demo", help="card name/alias or a folder with card.json (default demo)")
    parser.add_argument("--seeds", type=_seeds, default=_seeds(seeds), help=f"comma list of split seeds (default {seeds})")
    parser.add_argument("--pretrained", type=_bool, default=True, help="false: random weights (a control)")
    parser.add_argument("--weights", help="a local checkpoint file (plugin argument checkpoint=PATH)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="plugin argument, e.g. fp16=true")
    parser.add_argument("--out", default="reports", help="results root (default reports/)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--max-memory", type=_positive_float, default=4.0, metavar="GB", help="memory budget (default 4)")
    parser.add_argument("--members", type=_positive_int, default=members,
                        help=f"ensemble members per probe (default {members}; the paper uses 10)")
    parser.add_argument("--max-steps", type=_positive_int, default=None,
                        help="cap each member's optimiser steps (default: none, the official early stop only)")
    parser.add_argument("--max-train", type=_positive_int, default=None, help="keep the first n training images")
    parser.add_argument("--max-test", type=_positive_int, default=None, help="keep the first n test images")
    parser.add_argument("--cache-dtype", choices=["float16", "float32"], default="float16", help="feature cache dtype")
    parser.add_argument("--probe-precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="first-layer precision of the probes, as for bench run (default auto)")
    parser.add_argument("--batch-size", type=_positive_int, default=4, help="images per extraction batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or status lines")


def spec_from_args(args: argparse.Namespace, seed: int, **backbone_kwargs: Any):
    """A :class:`~bench.runner.RunSpec` from :func:`add_run_arguments` options (``backbone_kwargs`` win over ``--set``).

    Example:
        >>> p = argparse.ArgumentParser(); add_run_arguments(p)
        >>> spec_from_args(p.parse_args(["--set", "seed=3"]), 0, blocks=[6]).backbone_kwargs
        {'seed': 3, 'blocks': [6]}
    """
    from bench.cli import parse_options
    from bench.runner import RunSpec

    options = {**parse_options(args.set or []), **backbone_kwargs}
    if args.weights:
        if not Path(args.weights).is_file():
            raise BenchError(f"--weights {args.weights}: no such file")
        options["checkpoint"] = args.weights
    return RunSpec(backbone=args.backbone, dataset=args.dataset, seed=seed, pretrained=args.pretrained,
                   backbone_kwargs=options, device=args.device, max_memory_gb=args.max_memory, out=Path(args.out),
                   progress=not args.no_progress, extract_batch=args.batch_size, members=args.members,
                   max_train=args.max_train, max_test=args.max_test, cache_dtype=args.cache_dtype,
                   probe_precision=getattr(args, "probe_precision", "auto"))


def train_config(args: argparse.Namespace):
    """The official probe settings with ``--members`` / ``--max-steps`` applied (a :class:`~bench.probe.TrainConfig`).

    Example:
        >>> train_config(argparse.Namespace(members=2, max_steps=None)).members
        2
    """
    from bench.probe import TrainConfig

    return TrainConfig(members=args.members, max_steps=args.max_steps)


def probe_overrides(args: argparse.Namespace) -> dict:
    """What ``--members`` / ``--max-steps`` change, as overrides of a run's own settings (:func:`probe_config`).

    Example:
        >>> probe_overrides(argparse.Namespace(members=2, max_steps=None))
        {'members': 2, 'max_steps': None}
    """
    return {"members": args.members, "max_steps": args.max_steps}


def probe_config(prep: "Prepared", **overrides: Any):
    """The run's own probe settings (whatever its key holds: official loop, precision, ...) with ``overrides``.

    Example:
        >>> # probe_config(prep, members=2).members -> 2
    """
    from bench.probe import TrainConfig

    return TrainConfig(**{**prep.plan.key_parts["probe"], **overrides})


@dataclass
class Prepared:
    """A planned run whose features are all in the cache."""

    plan: Any  # bench.runner.Plan (its backbone is released after extraction)
    store: Any  # bench.features.FeatureStore
    feature_names: list[str]  # the backbone's maps, in store order (FeatureInfo.name)
    extracted: int  # images whose features THIS call computed (0: everything came from the cache)
    seconds: float  # wall time of the extraction stage
    timings: dict = field(default_factory=dict)


def prepare(spec: Any) -> Prepared:
    """Plan ``spec`` and make sure every train/test image's maps are cached (extracting only the missing ones).

    Example:
        >>> # prep = prepare(RunSpec("ddpm", "demo", backbone_kwargs={"blocks": [6, 8], "steps": [50]}))
        >>> # prep.feature_names -> ['t50.b6', 't50.b8']; prep.extracted -> 0 on a second call
    """
    from bench import runner

    p = runner.plan(spec)
    names = [f.name for f in p.backbone.feature_info]
    computed = [0]
    extract_batch = p.backbone.extract

    def counting(images: Any) -> Any:  # images that really go through the backbone (cache misses)
        computed[0] += int(images.shape[0])
        return extract_batch(images)

    p.backbone.extract = counting
    t0 = time.time()
    store = runner.extract(p)
    return Prepared(plan=p, store=store, feature_names=names, extracted=computed[0], seconds=time.time() - t0)


class MapSubset:
    """A read-only view of some maps of a :class:`~bench.features.FeatureStore`, in the order given.

    It answers ``load`` / ``map_arrays`` like the store, so the probe's pixel sources and the
    predictor read only the chosen maps: one cached extraction serves every subset.

    Example:
        >>> # MapSubset(store, [3]).load(image_id)  -> [the 4th map]
    """

    def __init__(self, store: Any, indices: Sequence[int]) -> None:
        if not indices:
            raise BenchError("select at least one feature map")
        self.store, self.indices = store, [int(i) for i in indices]
        self.folder = store.folder
        self.image_size = store.image_size

    def _selected_files(self, image_id: str) -> list[Path]:
        files = self.store._files(image_id)  # one file per map: read only the chosen ones
        return [files[i] for i in self._checked(len(files))]

    def load(self, image_id: str, *, mmap: bool = False) -> list:
        import numpy as np
        import torch

        return [torch.from_numpy(np.load(f, mmap_mode="c" if mmap else None)) for f in self._selected_files(image_id)]

    def map_arrays(self, image_id: str) -> list:
        import numpy as np

        return [np.load(f, mmap_mode="c") for f in self._selected_files(image_id)]

    def has(self, image_id: str) -> bool:
        return self.store.has(image_id)

    def _checked(self, n: int) -> list[int]:
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise BenchError(f"feature map index {bad[0]} out of range: the store {self.folder} holds {n} maps")
        return self.indices


def map_indices(feature_names: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Positions of the maps named ``wanted`` (FeatureInfo names) in the store; one-line error otherwise.

    Example:
        >>> map_indices(["t50.b5", "t50.b6", "t150.b5"], ["t150.b5"])
        [2]
    """
    where = {n: i for i, n in enumerate(feature_names)}
    missing = [w for w in wanted if w not in where]
    if missing:
        raise BenchError(f"no feature map named {missing[0]!r}; the backbone's maps are {', '.join(feature_names)}")
    return [where[w] for w in wanted]


def select_maps(store: Any, indices: Sequence[int]) -> MapSubset:
    """A view of the maps ``indices`` of ``store`` (see :class:`MapSubset`).

    Example:
        >>> # select_maps(prep.store, map_indices(prep.feature_names, ["t50.b6"]))
    """
    return MapSubset(store, indices)


def train_probe(prep: Prepared, store: Any = None, config: Any = None, *, progress: bool | None = None) -> dict:
    """Train the run's ensemble on ``store`` (a :class:`MapSubset`, default all maps) exactly as a run does.

    ``config``: None (the run's probe settings), a dict of overrides of them (:func:`probe_config`), or a
    :class:`~bench.probe.TrainConfig`. Member m gets the run's seed of member m. Returns
    :func:`bench.runner.fit_probe`'s dict.
    """
    from bench import runner
    from bench.labels import load_label, training_label

    p = prep.plan
    if config is None or isinstance(config, dict):
        config = probe_config(prep, **(config or {}))
    members = config.members
    seeds = p.key_parts["member_seeds"]
    if members > len(seeds):
        from bench.seeding import derive_seed

        seeds = [derive_seed(p.spec.seed, "member", m) for m in range(members)]
    labels = (training_label(load_label(s, p.card, p.spec.fit), p.card) for s in p.train)
    return runner.fit_probe(store or prep.store, [p.content[s.id] for s in p.train], labels, p.card,
                            seeds=seeds[:members], members=members, max_memory_gb=p.spec.max_memory_gb,
                            device=p.device, progress=p.spec.progress if progress is None else progress,
                            config=config)


def evaluate(prep: Prepared, trained: dict, store: Any = None,
             on_image: Callable[..., None] | None = None) -> dict:
    """Predict the run's test images from ``store`` (default all maps) and score them like a run.

    Returns ``{"miou": {official, standard}, "per_class_iou": ..., "mean_image_uncertainty": ...,
    "confusion": [[...]]}`` (confusion rows: ground truth, columns: prediction, ignore row last).
    """
    import numpy as np

    from bench import runner

    cm, uncertainties = runner.predict(prep.plan, store or prep.store, trained, on_image=on_image)
    out = runner.score(prep.plan, cm)
    out["mean_image_uncertainty"] = float(np.mean(uncertainties)) if uncertainties else None
    out["confusion"] = np.asarray(cm.counts).tolist()
    return out


def output_folder(out: str | Path, dataset: str, name: str) -> Path:
    """Where analysis ``name`` of ``dataset`` writes: ``<out>/analyses/<dataset>/<name>/`` (created).

    Example:
        >>> output_folder("/tmp/r", "demo", "sweep").as_posix()
        '/tmp/r/analyses/demo/sweep'
    """
    folder = Path(out) / "analyses" / dataset / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_meta(prep: Prepared) -> dict:
    """What produced an analysis' numbers: dataset and its content digest, split files, backbone config, run key.

    Example:
        >>> # run_meta(prep)["run_key"]
    """
    p = prep.plan
    return {
        "dataset": p.card.name, "seed": p.spec.seed, "split": p.spec.split,
        "backbone": p.spec.backbone, "pretrained": p.spec.pretrained, "weights_source": p.weights_source,
        "backbone_config": p.backbone_config, "feature_names": prep.feature_names,
        "files": {"train": [s.id for s in p.train], "test": [s.id for s in p.test]},
        "dataset_content": p.key_parts["dataset"]["content"], "run_key": p.run_key,
        "feature_cache": str(prep.store.folder), "cache_dtype": p.spec.cache_dtype,
    }


def write_meta(folder: str | Path, meta: dict, device: str = "cpu") -> Path:
    """Write ``folder/meta.json`` atomically: ``meta`` plus the analysis version and provenance (versions, git sha).

    Example:
        >>> import tempfile, json
        >>> path = write_meta(tempfile.mkdtemp(), {"analysis": "demo"})
        >>> json.loads(path.read_text())["analysis"]
        'demo'
    """
    from bench.results import provenance, write_json_atomic

    path = Path(folder) / "meta.json"
    write_json_atomic(path, {**meta, "analysis_version": ANALYSIS_VERSION, "provenance": provenance(device)})
    return path
