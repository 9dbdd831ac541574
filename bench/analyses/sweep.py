"""Fig. 2-3: which decoder block at which noise step segments best, from ONE feature extraction.

For each split seed, the run is planned with every requested block at every requested step, and its
features are extracted once into the cache (:func:`bench.analyses._common.prepare`; a second
sweep, or a ``bench run`` of the same configuration, extracts nothing). Then one probe per
(block, step) cell is trained on that single cached map (:func:`~bench.analyses._common.select_maps`)
and scored on the test images like a run. So B blocks x S steps cost one extraction plus B x S
probes, instead of B x S runs that each extract (``benchmarks/bench_sweep.py`` times both).

Small and large classes (Fig. 3): a class's *area* is its share of the labelled pixels of the seed's
training images (ignore pixels excluded; classes the card counts in the mIoU only). Classes whose
area is at most the median area are **small**, the others **large**; the mIoU of a group is the
mean official IoU over its classes. The rule and each class's area and group are in ``classes.csv``.

The backbone must take ``blocks`` and ``steps`` arguments and name its maps ``t<step>.b<block>``
(the ``ddpm`` plugin; spec §3.5). Outputs in ``<out>/analyses/<dataset>/sweep/``: ``cells.csv``
(every seed and cell, per-class IoU included), ``sweep.csv/png`` (mean over seeds, all classes),
``sweep_small.csv/png``, ``sweep_large.csv/png``, ``classes.csv``, ``meta.json``. Each cell's result
is kept in ``cells/`` under a key of everything that produced it, so a killed sweep resumes.

Example:
    >>> # bench analyze sweep --backbone ddpm --dataset demo --blocks 5,6,7,8,12 --steps 50,150,250 --seeds 0
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from bench.analyses._common import (add_run_arguments, evaluate, map_indices, output_folder, prepare, probe_config,
                                    run_meta, select_maps, spec_from_args, probe_overrides, train_probe, write_meta)

HELP = "mIoU of one probe per (block, noise step), all from one cached extraction (Fig. 2-3)"
NAME = "sweep"
SIZE_RULE = ("a class's area = its share of the labelled (non-ignore) pixels of the seed's training labels; "
             "small = area <= the median area over the classes the card counts, large = the others; "
             "group mIoU = mean official IoU over the group's classes")
FIGURES = {"sweep": "all classes", "sweep_small": "small classes", "sweep_large": "large classes"}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``bench analyze sweep`` options: the run options plus ``--blocks`` and ``--steps``."""
    from bench.launch import add_arguments as add_launcher_arguments

    add_run_arguments(parser, backbone="ddpm")
    parser.add_argument("--blocks", type=_int_list, default=[5, 6, 7, 8, 12], help="decoder blocks (default 5,6,7,8,12)")
    parser.add_argument("--steps", type=_int_list, default=[50, 150, 250], help="noise steps (default 50,150,250)")
    add_launcher_arguments(parser)  # --launcher local|slurm: one job per cell, after one extraction per seed


def class_areas(prep: Any) -> pd.DataFrame:
    """Per counted class: training pixels, area (share) and group (``small``/``large``) by :data:`SIZE_RULE`.

    Example:
        >>> # class_areas(prep)[["class", "share", "group"]]
    """
    import numpy as np

    from bench.labels import load_label

    p = prep.plan
    card = p.card
    counts = np.zeros(card.num_classes, dtype=np.int64)
    for s in p.train:
        lab = np.asarray(load_label(s, card, p.spec.fit)).ravel()
        lab = lab[(lab != card.ignore_label) & (lab >= 0) & (lab < card.num_classes)]
        counts += np.bincount(lab, minlength=card.num_classes)
    ids = list(card.miou_class_ids)
    total = max(1, int(counts[ids].sum()))
    shares = [counts[c] / total for c in ids]
    median = float(np.median(shares))
    return pd.DataFrame({
        "seed": p.spec.seed, "class_id": ids, "class": [card.classes[c] for c in ids],
        "pixels": [int(counts[c]) for c in ids], "share": shares,
        "group": ["small" if s <= median else "large" for s in shares], "median_share": median,
    })


def group_miou(per_class: dict, areas: pd.DataFrame, group: str) -> float:
    """Mean official IoU over the classes of ``group`` (NaN if the group is empty)."""
    iou = dict(zip(per_class["class_ids"], per_class["official"]))
    values = [iou[c] for c in areas.loc[areas["group"] == group, "class_id"]]
    return float(sum(values) / len(values)) if values else float("nan")


def _cell_key(prep: Any, name: str, config: Any) -> str:
    """Everything that produced a cell: the run key (data, split, weights, features), the map, the probe."""
    from bench.fingerprint import digest

    return digest({"run_key": prep.plan.run_key, "map": name, "probe": repr(config)})


def _cell_output(seed: int, block: int, step: int) -> str:
    """A cell's file, relative to the sweep folder."""
    return f"cells/seed{seed}/t{step}.b{block}.json"


def _stored_cell(path: Path, key: str) -> dict | None:
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            return old
    return None


def _cell(prep: Any, args: argparse.Namespace, folder: Path, areas: pd.DataFrame, block: int, step: int) -> dict:
    """Train and score the probe of one (block, step) map, or reuse the stored cell of the same key."""
    from bench.results import write_json_atomic

    name = f"t{step}.b{block}"
    config = probe_config(prep, **probe_overrides(args))
    key = _cell_key(prep, name, config)
    path = folder / _cell_output(prep.plan.spec.seed, block, step)
    old = _stored_cell(path, key)
    if old is not None:
        return old
    view = select_maps(prep.store, map_indices(prep.feature_names, [name]))
    t0 = time.time()
    trained = train_probe(prep, view, config)
    t1 = time.time()
    scored = evaluate(prep, trained, view)
    cell = {
        "key": key, "seed": prep.plan.spec.seed, "block": block, "step": step, "map": name,
        "channels": trained["dim"], "miou": scored["miou"]["official"], "miou_standard": scored["miou"]["standard"],
        "miou_small": group_miou(scored["per_class_iou"], areas, "small"),
        "miou_large": group_miou(scored["per_class_iou"], areas, "large"),
        "train_s": t1 - t0, "predict_s": time.time() - t1, "pixel_source": trained["pixel_source"],
        "steps_per_member": [m.get("steps") for m in trained["members"]],
        "per_class_iou": scored["per_class_iou"],
    }
    write_json_atomic(path, cell)
    return cell


def summarise(cells: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean and sample std over seeds of ``column`` per (block, step): the numbers a heat-map draws.

    Example:
        >>> df = pd.DataFrame({"block": [6, 6], "step": [50, 50], "seed": [0, 1], "miou": [0.4, 0.6]})
        >>> summarise(df, "miou").to_dict("records")[0]["miou"]
        0.5
    """
    g = cells.groupby(["block", "step"], sort=True)[column]
    out = g.agg(["count", "mean", "std"]).reset_index()
    return out.rename(columns={"count": "n", "mean": "miou", "std": "miou_std"})


def draw_heatmap(df: pd.DataFrame, title: str) -> Any:
    """A blocks x steps heat-map of ``df`` (columns block, step, miou in [0, 1]); values printed in %."""
    from bench.figures import new_figure

    grid = df.pivot(index="block", columns="step", values="miou").sort_index().sort_index(axis=1) * 100
    fig, ax = new_figure(1.6 + 1.1 * grid.shape[1], 1.2 + 0.55 * grid.shape[0])
    image = ax.imshow(grid.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [str(s) for s in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(b) for b in grid.index])
    ax.set_xlabel("noise step t")
    ax.set_ylabel("decoder block")
    ax.set_title(title, fontsize=9)
    finite = grid.values[~pd.isna(grid.values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            value = grid.values[i, j]
            if not pd.isna(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if value > middle else "white")
    fig.colorbar(image, ax=ax, label="mIoU (official, %)")
    return fig


def _title(meta: dict, which: str) -> str:
    seeds = meta.get("seeds", [])
    return f"{meta.get('backbone', '')} on {meta.get('dataset', '')}: {which}, seeds {','.join(map(str, seeds))}"


def redraw(folder: Path) -> list[Path]:
    """Redraw every heat-map PNG of a sweep folder from its CSVs alone (``bench report --redraw``)."""
    from bench.figures import save_figure

    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}
    written = []
    for stem, which in FIGURES.items():
        csv = folder / f"{stem}.csv"
        if csv.exists():
            written += save_figure(draw_heatmap(pd.read_csv(csv), _title(meta, which)), None, folder / stem)
    return written


def cell_unit(args: argparse.Namespace, seed: int, block: int, step: int) -> dict:
    """One cell as a launcher job: plan the seed's run (its features are in the cache), probe, store.

    Returns ``{output: key}`` for ``bench status``; the output path is relative to ``args.out``.
    """
    from bench.cards import get_card

    folder = output_folder(args.out, get_card(args.dataset).name, NAME)
    prep = prepare(spec_from_args(args, seed, blocks=args.blocks, steps=args.steps))
    cell = _cell(prep, args, folder, class_areas(prep), block, step)
    return {str((folder / _cell_output(seed, block, step)).relative_to(Path(args.out))): cell["key"]}


def _launch_cells(args: argparse.Namespace, launch: Any) -> dict[int, Any] | None:
    """Extract each seed's features here (once), then submit the missing cells as one job array.

    ``args.out`` must be absolute (a job may start elsewhere). Returns each seed's preparation when
    every cell is done (the local launcher waits for its jobs; on slurm, when a re-run finds nothing
    missing), so the caller draws the figures from it; None while jobs are still to run.
    """
    from bench.cards import get_card
    from bench.launch import Unit, local_width, submit
    from bench.parallel import auto_jobs

    card = get_card(args.dataset)
    folder = output_folder(args.out, card.name, NAME)
    preps, units = {}, []
    job_args = argparse.Namespace(**{**vars(args), "no_progress": True})  # jobs' logs are files, not terminals
    for seed in args.seeds:
        prep = preps[seed] = prepare(spec_from_args(args, seed, blocks=args.blocks, steps=args.steps))
        config = probe_config(prep, **probe_overrides(args))
        for step in prep.plan.backbone_config.get("steps", args.steps):
            for block in prep.plan.backbone_config.get("blocks", args.blocks):
                path, key = folder / _cell_output(seed, block, step), _cell_key(prep, f"t{step}.b{block}", config)
                units.append(Unit(name=f"sweep/{card.name}/seed{seed}/t{step}.b{block}", fn=cell_unit,
                                  args=(job_args, seed, block, step), outputs=[str(path.relative_to(Path(args.out)))],
                                  is_current=lambda p=path, k=key: _stored_cell(p, k) is not None))
    launch, threads = local_width(launch, auto_jobs(len(units), args.device, args.max_memory))
    manifest = submit(units, Path(args.out), launch, command=" ".join(sys.argv), threads=threads)
    if launch.launcher == "slurm" and manifest["units"]:
        print(f"{len(manifest['units'])} cells submitted; when `bench status --out {args.out}` shows them done, "
              f"re-run this command to draw the heat-maps (nothing is submitted again)", file=sys.stderr)
        return None
    return preps


def main(args: argparse.Namespace) -> int:
    """Run the sweep for every seed, then write the CSVs, heat-maps and meta.json."""
    from bench.cards import get_card
    from bench.figures import save_figure
    from bench.launch import options_from_args

    launch = options_from_args(args) if hasattr(args, "launcher") else None
    preps: dict[int, Any] = {}
    if launch is not None and launch.launcher != "inprocess":
        args = argparse.Namespace(**{**vars(args), "out": str(Path(args.out).resolve())})
        launched = _launch_cells(args, launch)
        if launched is None:
            return 0
        preps = launched
    card = get_card(args.dataset)
    folder = output_folder(args.out, card.name, NAME)
    cells, areas_all, seeds_meta = [], [], []
    total = len(args.seeds) * len(args.blocks) * len(args.steps)
    for seed in args.seeds:
        prep = preps.get(seed) or prepare(spec_from_args(args, seed, blocks=args.blocks, steps=args.steps))
        print(f"seed {seed}: features of {len(prep.plan.train) + len(prep.plan.test)} images ready "
              f"({prep.extracted} extracted now, {prep.seconds:.1f} s)", file=sys.stderr, flush=True)
        areas = class_areas(prep)
        areas_all.append(areas)
        for step in prep.plan.backbone_config.get("steps", args.steps):
            for block in prep.plan.backbone_config.get("blocks", args.blocks):
                cell = _cell(prep, args, folder, areas, block, step)
                cells.append(cell)
                print(f"[{len(cells)}/{total}] seed {seed} block {block} step {step}: mIoU {100 * cell['miou']:.1f} "
                      f"(small {100 * cell['miou_small']:.1f}, large {100 * cell['miou_large']:.1f}; "
                      f"probe {cell['train_s']:.1f} s)", file=sys.stderr, flush=True)
        seeds_meta.append({**run_meta(prep), "extraction": {"images_extracted": prep.extracted,
                                                             "seconds": prep.seconds}})
    table = pd.DataFrame([{k: v for k, v in c.items() if k not in {"per_class_iou", "steps_per_member", "key"}}
                          for c in cells])
    per_class = pd.DataFrame([
        {"seed": c["seed"], "block": c["block"], "step": c["step"], "class_id": cid, "class": name, "iou": iou}
        for c in cells for cid, name, iou in zip(c["per_class_iou"]["class_ids"], c["per_class_iou"]["class_names"],
                                                 c["per_class_iou"]["official"])
    ])
    meta = {
        "analysis": NAME, "dataset": card.name, "backbone": args.backbone, "seeds": args.seeds,
        "blocks": args.blocks, "steps": args.steps, "probe": repr(probe_config(prep, **probe_overrides(args))),
        "size_rule": SIZE_RULE, "metric": "official mIoU (fraction); heat-maps: mean over seeds, in %",
        "runs": seeds_meta,
        "timing": {"extract_s": sum(s["extraction"]["seconds"] for s in seeds_meta),
                   "probe_train_s": float(table["train_s"].sum()), "probe_predict_s": float(table["predict_s"].sum()),
                   "cells": len(table)},
    }
    _write_csv(table, folder / "cells.csv")
    _write_csv(per_class, folder / "cells_per_class.csv")
    _write_csv(pd.concat(areas_all, ignore_index=True), folder / "classes.csv")
    for stem, column in (("sweep", "miou"), ("sweep_small", "miou_small"), ("sweep_large", "miou_large")):
        summary = summarise(table, column)
        save_figure(draw_heatmap(summary, _title(meta, FIGURES[stem])), summary, folder / stem)
    write_meta(folder, meta, device=prep.plan.device)
    best = table.sort_values("miou", ascending=False).iloc[0]
    print(f"{folder}: best cell block {best['block']} step {best['step']} ({100 * best['miou']:.1f} mIoU); "
          f"extraction {meta['timing']['extract_s']:.1f} s, {len(table)} probes {meta['timing']['probe_train_s']:.1f} s")
    return 0


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    from bench.results import write_text_atomic

    write_text_atomic(path, df.to_csv(index=False))
