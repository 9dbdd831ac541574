"""Table 7: the probe's capacity (MLP width and depth), every variant trained on ONE feature extraction.

Variants (K classes; the paper's MLP has hidden widths (128, 32) for K < 30, else (256, 128)):

    original   the paper's hidden widths
    wider      every hidden width doubled ("twice wider"): (256, 64) for K < 30
    deeper     every hidden layer twice ("twice deeper"): (128, 128, 32, 32) for K < 30
    W1xW2x...  any hidden widths, e.g. 64x16

The paper does not say how its wider and deeper MLPs were built; the two rules above are our
reading. A depth other than two hidden layers needs a probe that builds any number of them
(:class:`bench.probe.EnsembleMLP`); if it cannot, the variant is refused in one line before any work.

    bench analyze mlp --backbone ddpm --dataset demo --variants original,wider,deeper --seeds 0

Writes ``mlp.csv/png`` (mean ± std over seeds per variant, the paper's Table 7 beside ours where it
applies, see :mod:`bench.analyses._paper`), ``mlp_runs.csv`` (per seed, with the layer sizes of the
trained members) and ``meta.json``.

Example:
    >>> hidden_for("wider", 9), hidden_for("deeper", 34), hidden_for("64x16", 9)
    ((256, 64), (256, 256, 128, 128), (64, 16))
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import pandas as pd

from bench.errors import BenchError

HELP = "Table 7: MLP width and depth variants of the probe (one extraction, one probe per variant)"
NAME = "mlp"
NAMED = ("original", "wider", "deeper")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench analyze mlp``: the run options plus ``--variants``."""
    from bench.analyses._common import add_run_arguments

    add_run_arguments(parser, backbone="ddpm", seeds="0")
    parser.add_argument("--variants", default="original,wider,deeper",
                        help="comma list of original, wider, deeper or hidden widths like 64x16 "
                             "(default original,wider,deeper)")


def hidden_for(variant: str, num_classes: int) -> tuple[int, ...]:
    """The hidden widths of a variant for ``num_classes`` classes; one-line error for a bad one.

    Example:
        >>> hidden_for("original", 29), hidden_for("original", 30)
        ((128, 32), (256, 128))
    """
    from bench.probe import mlp_hidden_sizes

    base = tuple(mlp_hidden_sizes(num_classes))
    if variant == "original":
        return base
    if variant == "wider":
        return tuple(2 * w for w in base)
    if variant == "deeper":
        return tuple(w for w in base for _ in range(2))
    try:
        widths = tuple(int(w) for w in variant.lower().split("x"))
    except ValueError:
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise BenchError(f"--variants: {variant!r} is neither {', '.join(NAMED)} nor hidden widths like 64x16")
    return widths


def layer_sizes(ensemble) -> list[int]:
    """Input, hidden and output widths of member 0 of a trained ensemble, read from its Linear layers.

    Example:
        >>> from bench.probe import EnsembleMLP
        >>> layer_sizes(EnsembleMLP(in_dim=5, num_classes=3, members=1))
        [5, 128, 32, 3]
    """
    import torch

    linears = [m for m in ensemble.member(0) if isinstance(m, torch.nn.Linear)]
    return [linears[0].in_features] + [m.out_features for m in linears]


def check_supported(hidden: tuple[int, ...], num_classes: int, variant: str) -> None:
    """Refuse (one line) hidden widths the probe cannot build as asked, before any extraction."""
    import torch

    from bench.probe import EnsembleMLP

    try:
        ens = EnsembleMLP(in_dim=2, num_classes=num_classes, members=1, hidden=hidden, seeds=[0]).eval()
        ens(torch.zeros(1, 2, 2))
        ok = layer_sizes(ens) == [2, *hidden, num_classes]
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError, BenchError):
        ok = False
    if not ok:
        raise BenchError(f"--variants {variant}: the probe (bench.probe.EnsembleMLP) cannot build the hidden "
                         f"widths {list(hidden)}")


def _draw(table: pd.DataFrame, title: str):
    from bench.figures import paper_bars

    ticks = [f"{v}\n{h}" for v, h in zip(table["variant"], table["hidden"])]
    return paper_bars(table, ticks, title, "paper (Table 7)", paper_errors=False)


def main(args: argparse.Namespace) -> int:
    """Per seed: one extraction, one probe per variant; write the table, the bars and meta.json."""
    from bench.analyses._common import (evaluate, output_folder, prepare, run_meta, spec_from_args,
                                        probe_config, probe_overrides, train_probe, write_meta)
    from bench.analyses._paper import TABLE7, paper_applies
    from bench.analyses.efficiency import summarise
    from bench.cards import get_card
    from bench.figures import save_figure
    from bench.results import write_text_atomic

    card = get_card(args.dataset)
    variants = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
    if not variants:
        raise BenchError("--variants is empty")
    hidden = {v: hidden_for(v, card.num_classes) for v in variants}
    for v in variants:
        check_supported(hidden[v], card.num_classes, v)
    rows, metas, applies, device = [], [], [], "cpu"
    for seed in args.seeds:
        prep = prepare(spec_from_args(args, seed))
        device = prep.plan.device
        applies.append(paper_applies(prep, args))
        metas.append({**run_meta(prep), "extracted_images": prep.extracted})
        for v in variants:
            config = {**probe_overrides(args), "hidden": hidden[v]}
            t0 = time.time()
            trained = train_probe(prep, config=config)
            scored = evaluate(prep, trained)
            sizes = layer_sizes(trained["ensemble"])
            rows.append({"variant": v, "seed": seed, "layers": "-".join(map(str, sizes)),
                         "params_per_member": int(sum(p.numel() for p in trained["ensemble"].member(0).parameters())),
                         "miou_official": 100 * scored["miou"]["official"],
                         "miou_standard": 100 * scored["miou"]["standard"], "seconds": time.time() - t0})
            print(f"seed {seed}: MLP {v} ({rows[-1]['layers']}) -> mIoU {rows[-1]['miou_official']:.1f} (official)")
    runs = pd.DataFrame(rows)
    table = summarise(runs, "variant", variants)
    table.insert(1, "hidden", ["x".join(map(str, hidden[v])) for v in variants])
    table.insert(2, "params_per_member", [int(runs[runs["variant"] == v]["params_per_member"].iloc[0]) for v in variants])
    paper = TABLE7.get(card.name, {}) if all(applies) else {}
    table["paper_mean"] = [paper.get(v, np.nan) for v in variants]
    table["delta"] = table["official_mean"] - table["paper_mean"]
    folder = output_folder(args.out, card.name, NAME)
    written = save_figure(_draw(table, f"{card.name}: {args.backbone}, probe capacity"), table, folder / "mlp")
    write_text_atomic(folder / "mlp_runs.csv", runs.to_csv(index=False))
    write_meta(folder, {"analysis": NAME, "backbone": args.backbone, "variants": {v: list(hidden[v]) for v in variants},
                        "seeds": args.seeds, "probe": dataclasses.asdict(probe_config(prep, **probe_overrides(args))),
                        "rules": {"wider": "every hidden width doubled", "deeper": "every hidden layer twice"},
                        "paper_values_shown": bool(paper), "runs": metas}, device=device)
    for path in [*written, folder / "mlp_runs.csv"]:
        print(path)
    return 0
