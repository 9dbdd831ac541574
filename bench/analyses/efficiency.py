"""Table 4: mIoU against the number of labelled training images, from ONE feature extraction per seed.

For each seed the run is planned and its features extracted once (:func:`bench.analyses._common.prepare`);
then one probe per size n is trained on the first n images of that seed's training list (the split's
train list is sorted by file id, so the sets are nested: the 10 images are among the 20) and scored
on the same, full test set. Sizes default to 10, 20, 30, ... up to the split's training count (which
is always included).

    bench analyze efficiency --backbone ddpm --dataset demo --sizes 5,10,20 --seeds 0,1

Writes ``efficiency.csv/png`` (mean ± std over seeds per size, official and standard mIoU, the
paper's Table 4 value beside ours where it applies, see :mod:`bench.analyses._paper`),
``efficiency_runs.csv`` (one row per seed and size) and ``meta.json``.

Example:
    >>> default_sizes(20), default_sizes(25), parse_sizes("10,5", 20)
    ([10, 20], [10, 20, 25], [5, 10])
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import pandas as pd

from bench.errors import BenchError

HELP = "Table 4: mIoU against the number of labelled training images (one extraction, one probe per size)"
NAME = "efficiency"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench analyze efficiency``: the run options plus ``--sizes``."""
    from bench.analyses._common import add_run_arguments

    add_run_arguments(parser, backbone="ddpm", seeds="0")
    parser.add_argument("--sizes", default=None,
                        help="comma list of training-set sizes (default 10, 20, ... and the split's full count)")


def default_sizes(n_train: int) -> list[int]:
    """10, 20, 30, ... below ``n_train``, then ``n_train`` itself (all of them when fewer than 10).

    Example:
        >>> default_sizes(40), default_sizes(7)
        ([10, 20, 30, 40], [7])
    """
    return sorted({*range(10, n_train, 10), n_train})


def parse_sizes(text: str | None, n_train: int) -> list[int]:
    """The sizes asked for (sorted, unique), each 1..``n_train``; one-line error otherwise.

    Example:
        >>> parse_sizes(None, 30)
        [10, 20, 30]
    """
    if text is None:
        return default_sizes(n_train)
    try:
        sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise BenchError(f"--sizes takes a comma list of integers, got {text!r}") from None
    bad = [n for n in sizes if not 1 <= n <= n_train]
    if not sizes or bad:
        raise BenchError(f"--sizes {text!r}: each size must be 1..{n_train} (the split's training images)")
    return sizes


def subset(prep, n: int):
    """``prep`` with only the first ``n`` training images (same features, same test set, same member seeds).

    Example:
        >>> # subset(prep, 10).plan.train == prep.plan.train[:10]
    """
    return dataclasses.replace(prep, plan=dataclasses.replace(prep.plan, train=prep.plan.train[:n]))


def summarise(runs: pd.DataFrame, key: str, order: list) -> pd.DataFrame:
    """Mean and sample std (n-1) over seeds of both mIoU variants, per value of ``key``, in ``order``.

    Example:
        >>> runs = pd.DataFrame({"size": [1, 1], "seed": [0, 1], "miou_official": [40.0, 50.0],
        ...                      "miou_standard": [41.0, 51.0]})
        >>> summarise(runs, "size", [1])[["official_mean", "official_std"]].values.tolist()
        [[45.0, 7.0710678118654755]]
    """
    rows = []
    for value in order:
        g = runs[runs[key] == value]
        row = {key: value, "n_seeds": len(g), "seeds": ",".join(str(s) for s in g["seed"])}
        for variant in ("official", "standard"):
            col = g[f"miou_{variant}"]
            row[f"{variant}_mean"] = col.mean()
            row[f"{variant}_std"] = col.std(ddof=1) if len(g) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _draw(table: pd.DataFrame, title: str):
    from bench.figures import new_figure

    fig, ax = new_figure(5.5, 3.8)
    ax.errorbar(table["size"], table["official_mean"], yerr=table["official_std"].fillna(0), marker="o",
                capsize=3, label="ours (official mIoU)")
    if table["paper_mean"].notna().any():
        ax.errorbar(table["size"], table["paper_mean"], yerr=table["paper_std"].fillna(0), marker="s",
                    linestyle="--", capsize=3, label="paper (Table 4)")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("mIoU (%)")
    ax.set_xticks(list(table["size"]))
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def main(args: argparse.Namespace) -> int:
    """Train one probe per size for every seed and write the table, the curve and meta.json."""
    from bench.analyses._common import (evaluate, output_folder, prepare, run_meta, spec_from_args,
                                        probe_config, probe_overrides, train_probe, write_meta)
    from bench.analyses._paper import TABLE4, paper_applies
    from bench.figures import save_figure
    from bench.results import write_text_atomic

    rows, metas, applies = [], [], []
    sizes: list[int] = []
    for seed in args.seeds:
        prep = prepare(spec_from_args(args, seed))
        n_train = len(prep.plan.train)
        sizes = parse_sizes(args.sizes, n_train)
        applies.append(paper_applies(prep, args))
        meta = {**run_meta(prep), "extracted_images": prep.extracted, "extract_seconds": prep.seconds,
                "training_prefixes": {}}
        for n in sizes:
            part = subset(prep, n)
            t0 = time.time()
            trained = train_probe(part, config=probe_overrides(args))
            scored = evaluate(part, trained)
            rows.append({"seed": seed, "size": n, "miou_official": 100 * scored["miou"]["official"],
                         "miou_standard": 100 * scored["miou"]["standard"],
                         "num_train_pixels": trained["num_train_pixels"], "seconds": time.time() - t0,
                         "first_train": part.plan.train[0].id, "last_train": part.plan.train[-1].id})
            meta["training_prefixes"][str(n)] = [s.id for s in part.plan.train]
            print(f"seed {seed}: {n} training images -> mIoU {rows[-1]['miou_official']:.1f} (official)")
        metas.append(meta)
    runs = pd.DataFrame(rows)
    table = summarise(runs, "size", sizes)
    card_name = metas[0]["dataset"]
    paper = TABLE4.get(card_name, {}) if applies and all(applies) else {}
    table["paper_mean"] = [paper.get(n, (np.nan, np.nan))[0] for n in table["size"]]
    table["paper_std"] = [paper.get(n, (np.nan, np.nan))[1] for n in table["size"]]
    table["delta"] = table["official_mean"] - table["paper_mean"]
    folder = output_folder(args.out, card_name, NAME)
    written = save_figure(_draw(table, f"{card_name}: {args.backbone}, mIoU vs labelled images"), table,
                          folder / "efficiency")
    write_text_atomic(folder / "efficiency_runs.csv", runs.to_csv(index=False))
    write_meta(folder, {"analysis": NAME, "backbone": args.backbone, "sizes": sizes, "seeds": args.seeds,
                        "subset_rule": "the first n images of each seed's training list (sorted by file id)",
                        "probe": dataclasses.asdict(probe_config(prep, **probe_overrides(args))),
                        "paper_values_shown": bool(paper),
                        "runs": metas}, device=prep.plan.device)
    for path in [*written, folder / "efficiency_runs.csv"]:
        print(path)
    return 0
