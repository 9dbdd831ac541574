"""Table 5: how the diffusion noise is drawn. One run per variant, same split, same probe seeds.

The variants are a backbone option, ``noise_mode`` (so they enter the backbone's resolved config,
hence the feature-cache key and the run key): ``shared`` (default: one eps for every step and image),
``per_step`` (one eps_t per step, shared by train and test images), ``per_image`` (a fresh eps for
every image and step, drawn from the image's content, so test images see noise no training image
saw). Only a backbone whose constructor takes ``noise_mode`` can run this analysis (the diffusion
backbone); ``shared`` is run without the option, so it is the very run ``bench run`` makes and its
features come from the same cache entries.

    bench analyze noise --backbone ddpm --dataset demo --seeds 0,1

Writes ``noise.csv/png`` (mean ± std over seeds per variant, paper's Table 5 beside ours where it
applies, see :mod:`bench.analyses._paper`), ``noise_runs.csv`` and ``meta.json``.

Example:
    >>> parse_modes("shared,per_image")
    ['shared', 'per_image']
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import time

import numpy as np
import pandas as pd

from bench.errors import BenchError

HELP = "Table 5: shared noise / a noise per step / fresh noise per image (unseen at test)"
NAME = "noise"
#: variant -> (noise shared by train and test, noise shared across steps), as Table 5's columns
MODES = {"shared": ("+", "+"), "per_step": ("+", "-"), "per_image": ("-", "-")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench analyze noise``: the run options plus ``--modes``."""
    from bench.analyses._common import add_run_arguments

    add_run_arguments(parser, backbone="ddpm", seeds="0")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)} (default all)")


def parse_modes(text: str) -> list[str]:
    """The noise variants asked for, in the order given; one-line error for an unknown one.

    Example:
        >>> parse_modes("per_step")
        ['per_step']
    """
    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise BenchError(f"--modes: unknown noise variant {bad[0] if bad else text!r}; choose from {', '.join(MODES)}")
    return modes


def _check_backbone(name: str) -> None:
    from bench.registry import resolve_name

    cls = resolve_name(name)[0]
    if "noise_mode" not in inspect.signature(cls.__init__).parameters:
        raise BenchError(f"backbone {cls.name!r} draws no noise (no noise_mode option); the noise analysis "
                         f"needs a diffusion backbone")


def _draw(table: pd.DataFrame, title: str):
    from bench.figures import paper_bars

    ticks = [f"{m}\n(train/test {a}, steps {b})" for m, a, b in
             zip(table["mode"], table["shared_train_test"], table["shared_across_steps"])]
    return paper_bars(table, ticks, title, "paper (Table 5)")


def main(args: argparse.Namespace) -> int:
    """One run per (variant, seed): extract (cached), train, score; write the table, the bars and meta.json."""
    from bench.analyses._common import (evaluate, output_folder, prepare, run_meta, spec_from_args,
                                        probe_config, probe_overrides, train_probe, write_meta)
    from bench.analyses._paper import TABLE5, paper_applies
    from bench.analyses.efficiency import summarise
    from bench.cli import parse_options
    from bench.figures import save_figure
    from bench.results import write_text_atomic

    modes = parse_modes(args.modes)
    _check_backbone(args.backbone)
    if "noise_mode" in parse_options(args.set or []):
        raise BenchError("--set noise_mode=... is what this analysis varies; use --modes instead")
    rows, metas, applies, device = [], [], [], "cpu"
    for seed in args.seeds:
        for mode in modes:
            extra = {} if mode == "shared" else {"noise_mode": mode}
            prep = prepare(spec_from_args(args, seed, **extra))
            device = prep.plan.device
            t0 = time.time()
            trained = train_probe(prep, config=probe_overrides(args))
            scored = evaluate(prep, trained)
            rows.append({"mode": mode, "seed": seed, "miou_official": 100 * scored["miou"]["official"],
                         "miou_standard": 100 * scored["miou"]["standard"], "seconds": time.time() - t0,
                         "extracted_images": prep.extracted})
            applies.append(paper_applies(prep, args, own_options=("noise_mode",)))
            metas.append({"mode": mode, **run_meta(prep), "extracted_images": prep.extracted})
            print(f"seed {seed}: noise {mode} -> mIoU {rows[-1]['miou_official']:.1f} (official)")
    runs = pd.DataFrame(rows)
    table = summarise(runs, "mode", modes)
    table.insert(1, "shared_train_test", [MODES[m][0] for m in modes])
    table.insert(2, "shared_across_steps", [MODES[m][1] for m in modes])
    dataset = metas[0]["dataset"]
    paper = TABLE5.get(dataset, {}) if all(applies) else {}
    table["paper_mean"] = [paper.get(m, (np.nan, np.nan))[0] for m in modes]
    table["paper_std"] = [paper.get(m, (np.nan, np.nan))[1] for m in modes]
    table["delta"] = table["official_mean"] - table["paper_mean"]
    folder = output_folder(args.out, dataset, NAME)
    written = save_figure(_draw(table, f"{dataset}: {args.backbone}, noise variants"), table, folder / "noise")
    write_text_atomic(folder / "noise_runs.csv", runs.to_csv(index=False))
    write_meta(folder, {"analysis": NAME, "backbone": args.backbone, "modes": modes, "seeds": args.seeds,
                        "probe": dataclasses.asdict(probe_config(prep, **probe_overrides(args))),
                        "paper_values_shown": bool(paper),
                        "per_image_note": "the paper's third row also redraws training noise at every probe "
                                          "iteration; with cached features each training image keeps one draw",
                        "runs": metas}, device=device)
    for path in [*written, folder / "noise_runs.csv"]:
        print(path)
    return 0
