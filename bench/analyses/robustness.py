"""Fig. 6: mIoU on corrupted test images (common corruptions, severities 1-5), probes trained on clean images.

Per backbone and seed the run is planned and its clean train and test features extracted
(cached as usual); ONE probe is trained on the clean training images, exactly as ``bench run``
trains it, and scored on the clean test set (severity 0) and on every (corruption, severity) version
of it. Corruptions come from ``imagecorruptions`` (the maintained ``imagecorruptions-imaug`` fork,
numpy 2 safe) and are applied to the model's input image (after the ``--fit`` rule, at the card's
resolution), each image with its own seed ``derive_seed(seed, "corrupt/<name>/<severity>", i)`` so a
re-run makes the same pixels. A corrupted image is cached in the feature store under the sha256 of
its pixels, like any other image: a re-run extracts nothing.

The spec does not list the paper's corruptions; the default set takes one per ImageNet-C family:
gaussian_noise (noise), defocus_blur (blur), fog (weather), jpeg_compression (digital). The package
refuses images under 32 px; so does this analysis, in one line, before any work.

    bench analyze robustness --backbone pixels,ddpm --dataset demo --severities 1,2,3,4,5 --seeds 0

Writes ``robustness.csv/png`` (mean over seeds per backbone, corruption and severity; one panel per
corruption, one curve per backbone), ``robustness_runs.csv`` (per seed) and ``meta.json``.

Example:
    >>> import numpy as np
    >>> img = np.zeros((32, 32, 3), np.uint8)
    >>> (corrupt_image(img, "gaussian_noise", 0, seed=1) == img).all(), corrupt_image(img, "fog", 3, seed=1).shape
    (True, (32, 32, 3))
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import time

import numpy as np
import pandas as pd

from bench.errors import BenchError

HELP = "Fig. 6: mIoU under common corruptions (severities 1-5) with probes trained on clean images"
NAME = "robustness"
DEFAULT_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "jpeg_compression")
MIN_SIZE = 32  # imagecorruptions refuses smaller images


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench analyze robustness``: the run options (a comma list of backbones) plus corruptions."""
    from bench.analyses._common import add_run_arguments

    add_run_arguments(parser, backbone="pixels,ddpm", seeds="0")
    parser.add_argument("--corruptions", default=",".join(DEFAULT_CORRUPTIONS),
                        help="comma list of imagecorruptions names, or 'common' (15) / 'all' (19) "
                             f"(default {','.join(DEFAULT_CORRUPTIONS)})")
    parser.add_argument("--severities", default="1,2,3,4,5", help="comma list of severities 1..5 (default all)")


def _package():
    try:
        import imagecorruptions
    except ImportError:
        raise BenchError("the robustness analysis needs imagecorruptions: pip install 'bench[analysis]' "
                         "(imagecorruptions-imaug)") from None
    return imagecorruptions


def _package_version() -> str:
    import importlib.metadata as md

    for dist in ("imagecorruptions-imaug", "imagecorruptions"):
        try:
            return f"{dist} {md.version(dist)}"
        except md.PackageNotFoundError:
            continue
    return "imagecorruptions (version unknown)"


def parse_corruptions(text: str) -> list[str]:
    """Corruption names (checked against the package), ``common`` and ``all`` expanded.

    Example:
        >>> parse_corruptions("fog,contrast"), len(parse_corruptions("all"))
        (['fog', 'contrast'], 19)
    """
    known = _package().get_corruption_names("all")
    names: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in ("common", "all"):
            names += _package().get_corruption_names(part)
        elif part in known:
            names.append(part)
        else:
            raise BenchError(f"--corruptions: unknown corruption {part!r}; known: {', '.join(known)}")
    if not names:
        raise BenchError("--corruptions is empty")
    return list(dict.fromkeys(names))


def parse_severities(text: str) -> list[int]:
    """Severities 1..5 (0, the clean images, is always evaluated).

    Example:
        >>> parse_severities("3,1")
        [1, 3]
    """
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise BenchError(f"--severities takes a comma list of integers 1..5, got {text!r}") from None
    if not values or any(not 1 <= v <= 5 for v in values):
        raise BenchError(f"--severities {text!r}: each severity must be 1..5")
    return values


def corrupt_image(image: np.ndarray, name: str, severity: int, *, seed: int) -> np.ndarray:
    """``image`` (uint8 ``[H, W, 3]``) with corruption ``name`` at ``severity`` (0: an unchanged copy).

    The package draws from NumPy's global generator (and glass_blur / impulse_noise take a ``seed``);
    both are seeded from ``seed`` and the global state is restored afterwards.

    Example:
        >>> img = np.full((32, 32, 3), 128, np.uint8)
        >>> a = corrupt_image(img, "gaussian_noise", 2, seed=0)
        >>> bool((a == corrupt_image(img, "gaussian_noise", 2, seed=0)).all()), bool((a != img).any())
        (True, True)
    """
    if severity == 0:
        return image.copy()
    if min(image.shape[:2]) < MIN_SIZE:
        raise BenchError(f"corruptions need images of at least {MIN_SIZE}x{MIN_SIZE} px, got "
                         f"{image.shape[1]}x{image.shape[0]}")
    package = _package()
    function = package.corruption_dict[name]
    kwargs = {"seed": seed % 2**32} if "seed" in inspect.signature(function).parameters else {}
    state = np.random.get_state()
    try:
        np.random.seed(seed % 2**32)
        out = package.corrupt(np.ascontiguousarray(image), severity=severity, corruption_name=name, **kwargs)
    finally:
        np.random.set_state(state)
    return np.ascontiguousarray(out, dtype=np.uint8)


def image_id(image: np.ndarray) -> str:
    """The feature-store id of an image made in memory: sha256 of its shape and pixels.

    Example:
        >>> len(image_id(np.zeros((2, 2, 3), np.uint8)))
        64
    """
    h = hashlib.sha256(f"uint8{list(image.shape)}".encode())
    h.update(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
    return h.hexdigest()


class LazyBackbone:
    """The run's backbone, built again only when a corrupted image is not cached yet (a re-run builds none).

    ``prepare`` releases the run's model after the clean extraction; this rebuilds it from the same
    spec and checks that its resolved config is the one the store is keyed by.
    """

    def __init__(self, prep) -> None:
        self.prep, self.model = prep, None

    def extract(self, images):
        if self.model is None:
            from bench.runner import build_backbone

            p = self.prep.plan
            self.model = build_backbone(p.spec, p.card, p.device)
            if self.model.config() != p.backbone_config:
                raise BenchError(f"{p.spec.backbone}: the rebuilt backbone's config differs from the run's")
        return self.model.extract(images)


def corrupted_test(prep, backbone, name: str, severity: int):
    """``prep`` whose test images are the corrupted ones (features extracted into the store if missing).

    ``backbone`` has ``extract`` (e.g. :class:`LazyBackbone`). Returns (the new Prepared, how many
    images this call extracted).
    """
    import torch

    from bench.samples import load_image
    from bench.seeding import derive_seed

    p = prep.plan
    images, content = {}, dict(p.content)
    for i, s in enumerate(p.test):
        img = corrupt_image(load_image(s, p.card, p.spec.fit), name, severity,
                            seed=derive_seed(p.spec.seed, f"corrupt/{name}/{severity}", i))
        content[s.id] = image_id(img)
        images[content[s.id]] = img
    todo = [h for h in images if not prep.store.has(h)]
    if todo:
        prep.store.ensure(todo, lambda ids: torch.from_numpy(np.stack([images[h] for h in ids])).permute(0, 3, 1, 2)
                          .contiguous(), backbone.extract, batch_size=p.spec.extract_batch,
                          progress=p.spec.progress, desc=f"{p.spec.label} {name} s{severity}")
    return dataclasses.replace(prep, plan=dataclasses.replace(p, content=content)), len(todo)


def _draw(table: pd.DataFrame, title: str):
    from bench.figures import new_figure

    corruptions = list(dict.fromkeys(table["corruption"]))
    cols = min(4, len(corruptions))
    rows = (len(corruptions) + cols - 1) // cols
    fig, axes = new_figure(3.2 * cols, 2.8 * rows, nrows=rows, ncols=cols, squeeze=False, sharey=True)
    for k, name in enumerate(corruptions):
        ax = axes[k // cols][k % cols]
        for backbone, g in table[table["corruption"] == name].groupby("backbone", sort=False):
            ax.errorbar(g["severity"], g["official_mean"], yerr=g["official_std"].fillna(0), marker="o",
                        capsize=2, label=backbone)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("severity")
        ax.set_xticks(sorted(table["severity"].unique()))
    for k in range(len(corruptions), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].set_ylabel("mIoU (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def main(args: argparse.Namespace) -> int:
    """Train one clean probe per backbone and seed, score it on every corrupted test set, write CSV/PNG/meta."""
    from bench.analyses._common import (evaluate, output_folder, prepare, run_meta, spec_from_args,
                                        probe_config, probe_overrides, train_probe, write_meta)
    from bench.analyses.efficiency import summarise
    from bench.cards import get_card
    from bench.figures import save_figure
    from bench.results import write_text_atomic

    corruptions, severities = parse_corruptions(args.corruptions), parse_severities(args.severities)
    backbones = [b.strip() for b in args.backbone.split(",") if b.strip()]
    card = get_card(args.dataset)
    if card.resolution is not None and card.resolution < MIN_SIZE:
        raise BenchError(f"dataset {card.name!r} has {card.resolution} px images; corruptions need at least {MIN_SIZE}")
    rows, metas = [], []
    for backbone_name in backbones:
        for seed in args.seeds:
            spec = dataclasses.replace(spec_from_args(args, seed), backbone=backbone_name)
            prep = prepare(spec)
            backbone = LazyBackbone(prep)
            label = prep.plan.spec.label
            t0 = time.time()
            trained = train_probe(prep, config=probe_overrides(args))
            meta = {**run_meta(prep), "extracted_images": prep.extracted, "train_seconds": time.time() - t0,
                    "corrupted_images_extracted": 0}

            def record(prepared, name: str, severity: int) -> None:
                scored = evaluate(prepared, trained)
                rows.append({"backbone": label, "seed": seed, "corruption": name, "severity": severity,
                             "miou_official": 100 * scored["miou"]["official"],
                             "miou_standard": 100 * scored["miou"]["standard"],
                             "mean_image_uncertainty": scored["mean_image_uncertainty"]})

            record(prep, "clean", 0)
            clean = rows[-1]
            for name in corruptions:
                rows.append({**clean, "corruption": name})  # severity 0 of every curve: the clean score
                for severity in severities:
                    corrupted, extracted = corrupted_test(prep, backbone, name, severity)
                    meta["corrupted_images_extracted"] += extracted
                    record(corrupted, name, severity)
                    print(f"{label} seed {seed}: {name} severity {severity} -> mIoU "
                          f"{rows[-1]['miou_official']:.1f} (clean {clean['miou_official']:.1f})")
            rows.remove(clean)
            backbone.model = None  # its memory back before the next backbone
            metas.append(meta)
    runs = pd.DataFrame(rows)
    tables = []
    for (label, name), g in runs.groupby(["backbone", "corruption"], sort=False):
        part = summarise(g, "severity", [0, *severities])
        tables.append(part.assign(backbone=label, corruption=name))
    table = pd.concat(tables, ignore_index=True)[["backbone", "corruption", "severity", "n_seeds", "seeds",
                                                  "official_mean", "official_std", "standard_mean", "standard_std"]]
    folder = output_folder(args.out, card.name, NAME)
    written = save_figure(_draw(table, f"{card.name}: mIoU under corruption (probes trained on clean images)"),
                          table, folder / "robustness")
    write_text_atomic(folder / "robustness_runs.csv", runs.to_csv(index=False))
    write_meta(folder, {
        "analysis": NAME, "backbones": backbones, "seeds": args.seeds, "corruptions": corruptions,
        "severities": severities, "corruption_package": _package_version(),
        "corruption_rule": "applied to the model input image (after --fit, at the card resolution); image i of "
                           "the test list seeded with derive_seed(seed, 'corrupt/<name>/<severity>', i)",
        "probe": dataclasses.asdict(probe_config(prep, **probe_overrides(args))), "runs": metas,
    })
    for path in [*written, folder / "robustness_runs.csv"]:
        print(path)
    return 0
