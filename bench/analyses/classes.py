"""Fig. 9 and Fig. 10: per-class IoU bars from finished runs, and the classes' statistics of a dataset.

Neither trains anything. ``per_class`` reads the result JSONs under ``<out>/runs/<dataset>/`` (each
holds the per-class IoU of both mIoU variants) and averages them over the re-split seeds, one bar
group per class and one bar per backbone label (results of different configurations under one
label, ``config_key``, are never averaged together; the released split is kept apart). ``stats``
counts, over the released train and test labels at the scoring resolution, each class's share of
the pixels and the number of images that contain it (the ignore label has a row of its own).

    bench analyze classes --dataset demo                     # every backbone with results for demo
    bench analyze classes --dataset demo --backbone pixels,ddpm --variant standard

Example:
    >>> import numpy as np
    >>> class_statistics([np.array([[0, 0], [1, 255]])], ["a", "b"], 255)["pixels"].tolist()
    [2, 1, 1]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from bench.errors import BenchError

HELP = "Fig. 9-10: per-class IoU bars (from run results) and class statistics (pixel share, images)"
NAME = "classes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench analyze classes``."""
    parser.add_argument("--dataset", default="demo", help="card name/alias or a folder with card.json (default demo)")
    parser.add_argument("--backbone", default=None,
                        help="comma list of result labels to draw (default: every label with results)")
    parser.add_argument("--out", default="reports", help="results root: reads <out>/runs, writes <out>/analyses")
    parser.add_argument("--variant", choices=["official", "standard"], default="official",
                        help="which per-class IoU to draw (default official)")
    parser.add_argument("--fit", choices=["stretch", "crop"], default="stretch",
                        help="how labels reach the scoring resolution (as in bench run)")


def class_statistics(labels: Iterable[np.ndarray], classes: Sequence[str], ignore_label: int) -> pd.DataFrame:
    """Pixels and images per class id (0..K-1, then the ignore label if it is no class) over ``labels``.

    Columns: ``class_id, class_name, pixels, pixel_share`` (of all pixels, ignore included),
    ``images`` (how many label maps contain the id), ``image_share``.

    Example:
        >>> df = class_statistics([np.array([[0, 1]]), np.array([[1, 1]])], ["x", "y"], 255)
        >>> df[["class_name", "pixels", "images"]].values.tolist()
        [['x', 1, 1], ['y', 3, 2], ['(ignore)', 0, 0]]
    """
    k = len(classes)
    ids = list(range(k)) + ([ignore_label] if not 0 <= ignore_label < k else [])
    size = max(ids) + 1
    pixels = np.zeros(size, dtype=np.int64)
    images = np.zeros(size, dtype=np.int64)
    n_images = 0
    known = np.zeros(size, dtype=bool)
    known[ids] = True
    for label in labels:
        values = np.asarray(label, dtype=np.int64).ravel()
        if values.size and (values.min() < 0 or values.max() >= size or not known[values].all()):
            bad = next(int(v) for v in np.unique(values) if not 0 <= v < size or not known[v])
            raise BenchError(f"label id {bad} outside the classes 0..{k - 1} (ignore {ignore_label})")
        counts = np.bincount(values, minlength=size)
        pixels += counts
        images += counts > 0
        n_images += 1
    total = int(pixels.sum())
    names = [classes[i] if i < k else "(ignore)" for i in ids]
    return pd.DataFrame({
        "class_id": ids, "class_name": names,
        "pixels": [int(pixels[i]) for i in ids],
        "pixel_share": [float(pixels[i]) / total if total else 0.0 for i in ids],
        "images": [int(images[i]) for i in ids],
        "image_share": [float(images[i]) / n_images if n_images else 0.0 for i in ids],
    })


def dataset_statistics(card, fit: str = "stretch") -> pd.DataFrame:
    """:func:`class_statistics` of the released train and test labels (column ``part``), at the scoring resolution.

    Example:
        >>> # dataset_statistics(get_card("demo")).groupby("part")["pixels"].sum()  -> 20 * 64 * 64 each
    """
    from bench.labels import load_label
    from bench.samples import dataset_root, list_samples

    root = dataset_root(card)
    parts = []
    for part in ("train", "test"):
        samples = list_samples(card, root, part)
        stats = class_statistics((load_label(s, card, fit) for s in samples), card.classes, card.ignore_label)
        parts.append(stats.assign(part=part, num_images=len(samples)))
    return pd.concat(parts, ignore_index=True)[
        ["part", "class_id", "class_name", "pixels", "pixel_share", "images", "image_share", "num_images"]]


def per_class_iou(results: Iterable[dict], variant: str = "official") -> pd.DataFrame:
    """Mean and sample std (percent) of each class's IoU over seeds, per (backbone label, split, config).

    Example:
        >>> r = {"backbone": "b", "split": "resplit", "config_key": "k", "seed": 0, "per_class_iou":
        ...      {"class_ids": [0, 1], "class_names": ["x", "y"], "official": [0.5, 1.0]}}
        >>> per_class_iou([r])["iou_mean"].tolist()
        [50.0, 100.0]
    """
    rows = []
    for r in results:
        pc = r["per_class_iou"]
        for cid, name, value in zip(pc["class_ids"], pc["class_names"], pc[variant]):
            rows.append({"backbone": r["backbone"], "split": r.get("split", "resplit"),
                         "config_key": r.get("config_key", ""), "seed": r.get("seed"), "class_id": cid,
                         "class_name": name, "iou": np.nan if value is None else 100.0 * float(value)})
    if not rows:
        return pd.DataFrame(columns=["backbone", "split", "config_key", "class_id", "class_name", "n",
                                     "iou_mean", "iou_std", "seeds"])
    df = pd.DataFrame(rows)
    keys = ["backbone", "split", "config_key", "class_id", "class_name"]
    out = df.groupby(keys, sort=False).agg(
        n=("iou", "count"), iou_mean=("iou", "mean"), iou_std=("iou", lambda v: v.std(ddof=1) if v.count() > 1 else np.nan),
        seeds=("seed", lambda v: ",".join(str(s) for s in sorted(v, key=str)))).reset_index()
    # one label, several configurations: say which bars are which (as bench report does for rows)
    clash = out.groupby(["backbone", "split"])["config_key"].transform("nunique") > 1
    out.loc[clash, "backbone"] = out.loc[clash].apply(lambda r: f"{r['backbone']} [config {r['config_key'][:8]}]",
                                                      axis=1)
    released = out["split"] == "released"
    out.loc[released, "backbone"] = out.loc[released, "backbone"] + " (released split)"
    return out


def _draw_iou(df: pd.DataFrame, title: str):
    from bench.figures import new_figure

    labels = list(dict.fromkeys(df["backbone"]))
    classes = list(dict.fromkeys(df["class_name"]))
    fig, ax = new_figure(max(6.0, 0.6 * len(classes) * max(1, len(labels)) ** 0.5 + 2), 4.0)
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        part = df[df["backbone"] == label].set_index("class_name").reindex(classes)
        x = np.arange(len(classes)) + (j - (len(labels) - 1) / 2) * width
        ax.bar(x, part["iou_mean"], width, yerr=part["iou_std"].fillna(0), label=label, capsize=2)
    ax.set_xticks(np.arange(len(classes)), classes, rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def _draw_stats(df: pd.DataFrame, title: str):
    from bench.figures import new_figure

    unused_ignore = (df["class_name"] == "(ignore)") & (df.groupby("class_name")["pixels"].transform("sum") == 0)
    classes = list(dict.fromkeys(df.loc[~unused_ignore, "class_name"]))  # the CSV keeps the empty ignore row
    fig, axes = new_figure(max(6.0, 0.5 * len(classes) + 2), 6.0, nrows=2, sharex=True)
    x = np.arange(len(classes))
    for j, part in enumerate(("train", "test")):
        sub = df[df["part"] == part].set_index("class_name").reindex(classes)
        axes[0].bar(x + (j - 0.5) * 0.4, 100 * sub["pixel_share"], 0.4, label=part)
        axes[1].bar(x + (j - 0.5) * 0.4, sub["images"], 0.4, label=part)
    axes[0].set_ylabel("pixels (%)")
    axes[1].set_ylabel("images containing it")
    axes[1].set_xticks(x, classes, rotation=45, ha="right")
    axes[0].set_title(title)
    axes[0].legend(fontsize=8)
    return fig


def _content_digest(card) -> str:
    """The same dataset content digest a run records (sha256 of every released image and label file)."""
    from bench.fingerprint import digest, file_sha256
    from bench.samples import dataset_root, list_samples

    root = dataset_root(card)
    pool = list_samples(card, root, "train") + list_samples(card, root, "test")
    return digest({s.id: [file_sha256(s.image), file_sha256(s.label)] for s in pool}, 32)


def main(args: argparse.Namespace) -> int:
    """Write ``class_stats.csv/png`` (Fig. 10) and, when runs exist, ``per_class_iou.csv/png`` (Fig. 9)."""
    from bench.analyses._common import output_folder, write_meta
    from bench.cards import get_card
    from bench.figures import save_figure
    from bench.results import iter_results

    card = get_card(args.dataset)
    wanted = [b.strip() for b in args.backbone.split(",") if b.strip()] if args.backbone else None
    results = [r for r in iter_results(Path(args.out)) if r["dataset"] == card.name
               and (wanted is None or r["backbone"] in wanted)]
    if wanted:
        missing = [b for b in wanted if b not in {r["backbone"] for r in results}]
        if missing:
            raise BenchError(f"no results for backbone {missing[0]!r} on {card.name} under {Path(args.out) / 'runs'}; "
                             f"run `bench run --backbone {missing[0]} --dataset {card.name}` first")
    stats = dataset_statistics(card, args.fit)
    folder = output_folder(args.out, card.name, NAME)
    title = card.title or card.name
    written = save_figure(_draw_stats(stats, f"{title}: class statistics (released train / test)"), stats,
                          folder / "class_stats")
    iou = per_class_iou(results, args.variant)
    if not iou.empty:
        written += save_figure(_draw_iou(iou, f"{title}: per-class IoU ({args.variant}), mean ± std over seeds"),
                               iou, folder / "per_class_iou")
    meta = {
        "analysis": NAME, "dataset": card.name, "dataset_content": _content_digest(card),
        "variant": args.variant, "fit": args.fit,
        "stats_over": "released train and test labels at the scoring resolution",
        "results": [{"path": r["_path"], "backbone": r["backbone"], "seed": r.get("seed"), "run_key": r["run_key"],
                     "config_key": r.get("config_key", "")} for r in results],
    }
    write_meta(folder, meta)
    for path in written:
        print(path)
    if iou.empty:
        print(f"no run results for {card.name} under {Path(args.out) / 'runs'}: per-class IoU bars skipped "
              f"(run `bench run --dataset {card.name} ...` first)")
    return 0
