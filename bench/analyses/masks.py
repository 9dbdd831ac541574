"""Fig. 5: image, ground truth, prediction and the ensemble's uncertainty, side by side in the class palette.

Two ways to get the panels, both writing ``<out>/analyses/<dataset>/masks/<label>/seed<k>/``:

- ``bench run ... --save-masks N``: the run itself draws its first N test images after predicting
  (an output option: it is not part of the run key, and a reused result draws nothing);
- ``bench analyze masks --backbone ddpm --dataset demo --images 4``: plans the run, reuses the cached
  features, trains the run's ensemble (same member seeds, same probe) and draws the panels.

Each folder holds ``masks.png`` (rows: images; columns: image, ground truth, prediction, per-pixel
Jensen-Shannon uncertainty of the members, spec §6), ``masks.csv`` (per image: pixel accuracy over
non-ignore pixels, mean and top-10 % JS, classes present), ``masks.npz`` (the arrays the figure is
drawn from: ``redraw`` needs nothing else) and ``meta.json``.

The palette (:func:`class_palette`): a card's ``palette`` if it has one, the preview colours of the
built-in demo generator for its cards, otherwise a fixed list (matplotlib's tab20, then evenly
spaced hues); the ignore label is grey.

Example:
    >>> class_palette_for(3, None).shape
    (3, 3)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bench.analyses._common import (add_run_arguments, evaluate, prepare, probe_config, run_meta, spec_from_args,
                                    probe_overrides, train_probe, write_meta)

HELP = "image, ground truth, prediction and ensemble uncertainty side by side (Fig. 5)"
NAME = "masks"
IGNORE_COLOUR = (128, 128, 128)


def class_palette_for(num_classes: int, generator: str | None) -> np.ndarray:
    """``[K, 3]`` uint8 colours: the demo generator's preview colours for its cards, else a fixed list."""
    if generator == "demo":
        from bench import demo

        if num_classes <= demo.NUM_CLASSES:
            return demo.colourise(np.arange(num_classes)[None, :])[0]
    from bench.figures import pyplot

    tab = pyplot().get_cmap("tab20")
    colours = [tab(i)[:3] for i in range(min(num_classes, 20))]
    if num_classes > 20:
        import colorsys

        extra = num_classes - 20
        colours += [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.9) for i in range(extra)]
    return (np.array(colours).reshape(-1, 3) * 255).round().astype(np.uint8)


def class_palette(card: Any) -> np.ndarray:
    """The card's palette (``card.palette`` if present) or :func:`class_palette_for` its generator.

    Example:
        >>> from bench.cards import get_card
        >>> class_palette(get_card("demo")).shape
        (9, 3)
    """
    own = getattr(card, "palette", None)
    if own:
        return np.asarray(own, dtype=np.uint8).reshape(card.num_classes, 3)
    return class_palette_for(card.num_classes, getattr(card, "generator", ""))


def colour_labels(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Label ids ``[H, W]`` -> uint8 RGB ``[H, W, 3]``; ids outside the palette (the ignore label) are grey.

    Example:
        >>> colour_labels(np.array([[0, 255]]), np.array([[10, 20, 30]], dtype=np.uint8)).tolist()
        [[[10, 20, 30], [128, 128, 128]]]
    """
    out = np.empty((*label.shape, 3), dtype=np.uint8)
    out[:] = IGNORE_COLOUR
    known = (label >= 0) & (label < len(palette))
    out[known] = palette[label[known]]
    return out


def image_stats(ids: Sequence[str], gts: np.ndarray, preds: np.ndarray, js: np.ndarray, ignore: int) -> pd.DataFrame:
    """Per image: accuracy over non-ignore pixels, mean JS, top-10 % JS (the spec's image uncertainty), classes."""
    rows = []
    for image_id, gt, pred, u in zip(ids, gts, preds, js):
        valid = gt != ignore
        flat = np.sort(u.ravel())[::-1]
        rows.append({
            "image": image_id, "pixel_accuracy": float((pred[valid] == gt[valid]).mean()) if valid.any() else float("nan"),
            "mean_js": float(u.mean()), "image_uncertainty": float(flat[: max(1, flat.size // 10)].mean()),
            "gt_classes": " ".join(map(str, sorted(set(np.unique(gt[valid]).tolist())))),
            "pred_classes": " ".join(map(str, sorted(set(np.unique(pred).tolist())))),
        })
    return pd.DataFrame(rows)


def draw_panels(images: np.ndarray, gts: np.ndarray, preds: np.ndarray, js: np.ndarray, palette: np.ndarray,
                class_names: Sequence[str], title: str = "") -> Any:
    """Rows of (image, ground truth, prediction, JS uncertainty) with a class legend; JS on one shared scale."""
    from matplotlib.patches import Patch

    from bench.figures import new_figure

    n = len(images)
    rows = -(-len(class_names) // 6)  # legend rows
    # columns: 4 panels + a narrow colour bar; a last row holds the class legend (tight_layout-friendly)
    fig, axes = new_figure(7.6, 1.8 * n + 0.3 * rows + 0.5, nrows=n + 1, ncols=5, squeeze=False,
                           gridspec_kw={"width_ratios": [1, 1, 1, 1, 0.08], "height_ratios": [1] * n + [0.16 * rows + 0.05]})
    grid = axes[0, 0].get_gridspec()
    for ax in {*axes[:, 4], *axes[n, :]}:
        ax.remove()
    vmax = float(max(js.max(), 1e-6))
    shown = None
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 1].imshow(colour_labels(gts[i], palette))
        axes[i, 2].imshow(colour_labels(preds[i], palette))
        shown = axes[i, 3].imshow(js[i], cmap="magma", vmin=0.0, vmax=vmax)
        for ax in axes[i, :4]:
            ax.set_axis_off()
    for ax, name in zip(axes[0], ("image", "ground truth", "prediction", "uncertainty (JS)")):
        ax.set_title(name, fontsize=9)
    fig.colorbar(shown, cax=fig.add_subplot(grid[:n, 4]))
    legend = fig.add_subplot(grid[n, :4])
    legend.set_axis_off()
    handles = [Patch(facecolor=palette[c] / 255, edgecolor="0.5", linewidth=0.5, label=name)
               for c, name in enumerate(class_names)]
    legend.legend(handles=handles, loc="center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def write_panels(folder: Path, images: np.ndarray, gts: np.ndarray, preds: np.ndarray, js: np.ndarray,
                 ids: Sequence[str], card: Any, meta: dict, title: str = "", device: str = "cpu") -> list[Path]:
    """Write ``masks.npz`` (the arrays), ``masks.csv``, ``masks.png`` and ``meta.json`` into ``folder``."""
    from bench.figures import save_figure

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    palette = class_palette(card)
    tmp = folder / ".masks.tmp.npz"
    np.savez_compressed(tmp, images=images, gts=gts, preds=preds, js=js.astype(np.float32), palette=palette,
                        class_names=np.array(card.classes), ignore_label=card.ignore_label, title=title)
    tmp.replace(folder / "masks.npz")
    stats = image_stats(ids, gts, preds, js, card.ignore_label)
    written = save_figure(draw_panels(images, gts, preds, js, palette, card.classes, title), stats, folder / "masks")
    write_meta(folder, {"analysis": NAME, **meta, "palette": palette.tolist(), "images": list(ids)}, device=device)
    return [folder / "masks.npz", *written]


def redraw(folder: Path) -> list[Path]:
    """Redraw ``masks.png`` from ``masks.npz`` alone."""
    from bench.figures import save_figure

    folder = Path(folder)
    if not (folder / "masks.npz").exists():
        return []
    d = np.load(folder / "masks.npz")
    fig = draw_panels(d["images"], d["gts"], d["preds"], d["js"], d["palette"], [str(c) for c in d["class_names"]],
                      str(d["title"]))
    return save_figure(fig, None, folder / "masks")


class MaskCollector:
    """A :func:`bench.runner.predict` ``on_image`` hook keeping the first ``n`` test images' vote and JS maps."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.items: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, index: int, sample: Any, labels: Any, js: Any, gt: np.ndarray) -> None:
        if index < self.n:
            self.items.append((sample, np.asarray(labels), np.asarray(js).reshape(np.asarray(labels).shape),
                               np.asarray(gt)))

    def write(self, folder: Path, card: Any, fit: str, meta: dict, title: str, device: str = "cpu") -> list[Path]:
        """Draw the collected images (read again from disk, as the model saw them) into ``folder``."""
        from bench.samples import load_image

        if not self.items:
            return []
        images = np.stack([load_image(s, card, fit) for s, *_ in self.items])
        preds = np.stack([p for _, p, _, _ in self.items])
        js = np.stack([u for _, _, u, _ in self.items])
        gts = np.stack([g for _, _, _, g in self.items])
        if images.shape[1:3] != gts.shape[1:3]:  # a non-square photo scored at its label's size: show that grid
            from PIL import Image

            images = np.stack([np.asarray(Image.fromarray(im).resize(gts.shape[2:0:-1], Image.BILINEAR)) for im in images])
        return write_panels(folder, images, gts, preds, js, [s.id for s, *_ in self.items], card, meta, title, device)


def run_folder(out: Path, dataset: str, label: str, seed: Any) -> Path:
    """``<out>/analyses/<dataset>/masks/<label>/seed<k>/``: one folder per run, so parallel runs never share a file.

    Example:
        >>> run_folder(Path("r"), "demo", "ddpm", 0).as_posix()
        'r/analyses/demo/masks/ddpm/seed0'
    """
    return Path(out) / "analyses" / dataset / NAME / label / f"seed{seed}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``bench analyze masks`` options: the run options plus ``--images``."""
    from bench.cli import _positive_int

    add_run_arguments(parser, backbone="ddpm")
    parser.add_argument("--images", type=_positive_int, default=4, help="test images to draw (default 4)")


def main(args: argparse.Namespace) -> int:
    """For each seed: reuse the cached features, train the run's ensemble, predict, draw the first images."""
    from bench.cards import get_card

    card = get_card(args.dataset)
    for seed in args.seeds:
        prep = prepare(spec_from_args(args, seed))
        p = prep.plan
        config = probe_config(prep, **probe_overrides(args))
        trained = train_probe(prep, None, config)
        collect = MaskCollector(args.images)
        scored = evaluate(prep, trained, None, on_image=collect)
        folder = run_folder(args.out, card.name, p.spec.label, seed)
        title = f"{p.spec.label} on {card.name}, seed {seed}: mIoU {100 * scored['miou']['official']:.1f} (official)"
        meta = {**run_meta(prep), "probe": repr(config), "miou": scored["miou"], "source": "bench analyze masks"}
        collect.write(folder, card, p.spec.fit, meta, title, device=p.device)
        print(f"{folder / 'masks.png'}  (mIoU official {100 * scored['miou']['official']:.1f})", file=sys.stderr)
    return 0
