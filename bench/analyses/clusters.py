"""Fig. 4: k-means on the per-pixel features of chosen blocks and noise steps, drawn over the images.

For each chosen map (e.g. block 6 at step 50) the per-pixel features of a few test images (the
map bilinearly sampled at every pixel, exactly the features a probe sees) are clustered together by
k-means (:func:`kmeans`: seeded k-means++ initialisation, Lloyd iterations, written here in torch),
so one cluster has one colour in every image. Clusters are numbered by size (0 = largest). With
more pixels than ``--max-pixels`` the centres are fitted on a seeded random subset of pixels, then
every pixel is assigned to its nearest centre.

Outputs in ``<out>/analyses/<dataset>/clusters/``: ``clusters.png`` (rows: images; columns: the
image, then one cluster map per chosen map drawn over it) with ``clusters.csv`` (per map and cluster:
pixels, share, the ground-truth class it covers most and that class's share of it), ``cluster_sizes.csv``
(per image), ``clusters.npz`` (images and cluster maps: ``redraw`` draws the PNG from it and the
CSVs alone) and ``meta.json``.

Example:
    >>> # bench analyze clusters --backbone ddpm --dataset demo --blocks 6 --steps 50 --k 5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.analyses._common import add_run_arguments, map_indices, output_folder, prepare, run_meta, spec_from_args, write_meta

HELP = "k-means maps of the per-pixel features of chosen blocks and noise steps (Fig. 4)"
NAME = "clusters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``bench analyze clusters`` options."""
    from bench.analyses.sweep import _int_list
    from bench.cli import _positive_int

    add_run_arguments(parser, backbone="ddpm")
    parser.add_argument("--blocks", type=_int_list, default=[6], help="decoder blocks, one clustering each (default 6)")
    parser.add_argument("--steps", type=_int_list, default=[50], help="noise steps, one clustering each (default 50)")
    parser.add_argument("--k", type=_positive_int, default=5, help="clusters (default 5)")
    parser.add_argument("--images", type=_positive_int, default=4, help="test images to cluster and draw (default 4)")
    parser.add_argument("--max-pixels", type=_positive_int, default=200_000,
                        help="pixels the centres are fitted on (a seeded subset if more; default 200000)")
    parser.add_argument("--iters", type=_positive_int, default=100, help="maximum Lloyd iterations (default 100)")


def _sq_distances(x: Any, centers: Any) -> Any:
    """``[n, k]`` squared Euclidean distances (expanded form, clamped at 0 against rounding)."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centers.T + (centers * centers).sum(1)).clamp_min(0)


def assign(x: Any, centers: Any, chunk: int = 65536) -> Any:
    """Nearest centre of each row of ``x`` (``[n]`` int64), ``chunk`` rows at a time.

    Example:
        >>> import torch
        >>> assign(torch.tensor([[0.0], [9.0]]), torch.tensor([[10.0], [1.0]])).tolist()
        [1, 0]
    """
    import torch

    out = torch.empty(len(x), dtype=torch.int64)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = _sq_distances(x[start : start + chunk], centers).argmin(1)
    return out


def kmeans(x: Any, k: int, *, seed: int = 0, iters: int = 100, tol: float = 1e-6) -> tuple[Any, Any, float]:
    """k-means of the rows of ``x`` ``[n, d]``: (labels ``[n]``, centres ``[k, d]``, inertia).

    k-means++ initialisation from a ``torch.Generator`` seeded with ``seed`` (so it is reproducible),
    then Lloyd iterations until no label changes or the centres move less than ``tol`` (relative),
    at most ``iters`` times. An emptied cluster is re-seeded at the point farthest from its centre.
    Clusters are renumbered by decreasing size (ties: by first appearance), so label 0 is the largest.

    Example:
        >>> import torch
        >>> x = torch.cat([torch.zeros(5, 2), torch.full((3, 2), 10.0)])
        >>> labels, centers, _ = kmeans(x, 2, seed=0)
        >>> labels.tolist()
        [0, 0, 0, 0, 0, 1, 1, 1]
    """
    import torch

    from bench.errors import BenchError

    x = x.float()
    n = len(x)
    if not 1 <= k <= n:
        raise BenchError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    g = torch.Generator().manual_seed(int(seed))
    centers = x[torch.randint(n, (1,), generator=g)].clone()
    nearest = _sq_distances(x, centers)[:, 0]
    while len(centers) < k:  # k-means++: the next centre with probability proportional to D(x)^2
        total = nearest.sum()
        probs = nearest / total if total > 0 else torch.full((n,), 1.0 / n)
        new = x[torch.multinomial(probs, 1, generator=g)]
        centers = torch.cat([centers, new])
        nearest = torch.minimum(nearest, _sq_distances(x, new)[:, 0])
    labels = assign(x, centers)
    for _ in range(iters):
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).float()
        new_centers = sums / counts.clamp_min(1).unsqueeze(1)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            far = int(_sq_distances(x, new_centers).gather(1, labels[:, None]).argmax())
            new_centers[empty] = x[far]
        shift = (new_centers - centers).norm() / centers.norm().clamp_min(1e-12)
        centers = new_centers
        new_labels = assign(x, centers)
        done = torch.equal(new_labels, labels) or float(shift) < tol
        labels = new_labels
        if done:
            break
    counts = torch.bincount(labels, minlength=k)
    first = torch.full((k,), n, dtype=torch.int64).scatter_reduce(0, labels, torch.arange(n), "amin")
    order = sorted(range(k), key=lambda c: (-int(counts[c]), int(first[c])))
    remap = torch.empty(k, dtype=torch.int64)
    remap[torch.tensor(order)] = torch.arange(k)
    labels, centers = remap[labels], centers[torch.tensor(order)]
    inertia = float(_sq_distances(x, centers).gather(1, labels[:, None]).sum())
    return labels, centers, inertia


def cluster_colours(k: int) -> np.ndarray:
    """``[k, 3]`` uint8 colours for cluster ids (matplotlib's tab10, then tab20)."""
    from bench.figures import pyplot

    plt = pyplot()
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return (np.array([cmap(i % cmap.N)[:3] for i in range(k)]) * 255).round().astype(np.uint8)


def draw_grid(images: np.ndarray, maps: np.ndarray, names: list[str], k: int, alpha: float = 0.55) -> Any:
    """Rows: images ``[N, H, W, 3]`` uint8; columns: the image, then ``maps[m, n]`` ``[H, W]`` drawn over it."""
    from bench.figures import new_figure

    n_img, n_map = images.shape[0], maps.shape[0]
    colours = cluster_colours(k)
    fig, axes = new_figure(1.6 * (n_map + 1), 1.6 * n_img, nrows=n_img, ncols=n_map + 1, squeeze=False)
    for i in range(n_img):
        axes[i, 0].imshow(images[i])
        for m in range(n_map):
            overlay = (alpha * colours[maps[m, i]] + (1 - alpha) * images[i]).round().astype(np.uint8)
            axes[i, m + 1].imshow(overlay)
            if i == 0:
                axes[i, m + 1].set_title(f"{names[m]}, k={k}", fontsize=8)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig


def redraw(folder: Path) -> list[Path]:
    """Redraw ``clusters.png`` from ``clusters.npz`` and the CSV (no features, no model)."""
    from bench.figures import save_figure

    folder = Path(folder)
    if not (folder / "clusters.npz").exists():
        return []
    data = np.load(folder / "clusters.npz")
    names = list(dict.fromkeys(pd.read_csv(folder / "clusters.csv")["map"]))
    return save_figure(draw_grid(data["images"], data["maps"], names, int(data["k"])), None, folder / "clusters")


def main(args: argparse.Namespace) -> int:
    """Cluster the chosen maps of the first ``--images`` test images of each seed (the first seed is drawn)."""
    import torch

    from bench import features
    from bench.cards import get_card
    from bench.figures import save_figure
    from bench.labels import load_label
    from bench.results import write_text_atomic
    from bench.samples import load_image
    from bench.seeding import derive_seed

    card = get_card(args.dataset)
    seed = args.seeds[0]
    if len(args.seeds) > 1:
        print(f"clusters: using seed {seed} only (one figure)", file=sys.stderr)
    prep = prepare(spec_from_args(args, seed, blocks=args.blocks, steps=args.steps))
    p = prep.plan
    samples = p.test[: args.images]
    names = [f"t{t}.b{b}" for t in p.backbone_config["steps"] for b in p.backbone_config["blocks"]]
    indices = map_indices(prep.feature_names, names)
    images = np.stack([load_image(s, card, p.spec.fit) for s in samples])
    gts = [np.asarray(load_label(s, card, p.spec.fit)) for s in samples]
    size = gts[0].shape
    ys, xs = (t.reshape(-1) for t in torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij"))
    all_maps, summary, sizes, inertias = [], [], [], {}
    for name, index in zip(names, indices):
        feats = torch.cat([features.sample_maps([prep.store.load(p.content[s.id])[index]], ys, xs, size)
                           for s in samples])
        fit_on = feats
        if len(feats) > args.max_pixels:
            pick = torch.randperm(len(feats), generator=torch.Generator().manual_seed(derive_seed(seed, "kmeans")))
            fit_on = feats[pick[: args.max_pixels]]
        _, centers, inertia = kmeans(fit_on, args.k, seed=derive_seed(seed, "kmeans"), iters=args.iters)
        labels = assign(feats, centers).reshape(len(samples), *size).numpy()
        inertias[name] = inertia
        all_maps.append(labels)
        gt_all = np.concatenate([g.ravel() for g in gts])
        for c in range(args.k):
            inside = gt_all[labels.ravel() == c]
            inside = inside[inside != card.ignore_label]
            counts = np.bincount(inside, minlength=card.num_classes) if inside.size else np.zeros(card.num_classes)
            top = int(np.argmax(counts))
            summary.append({"map": name, "cluster": c, "pixels": int((labels == c).sum()),
                            "share": float((labels == c).mean()),
                            "majority_class": card.classes[top] if inside.size else "",
                            "majority_share": float(counts[top] / inside.size) if inside.size else float("nan")})
            for i, s in enumerate(samples):
                sizes.append({"map": name, "image": s.id, "cluster": c, "pixels": int((labels[i] == c).sum())})
        print(f"{name}: k={args.k} on {len(fit_on)} pixels of {len(samples)} images, inertia {inertia:.4g}",
              file=sys.stderr)
    folder = output_folder(args.out, card.name, NAME)
    maps = np.stack(all_maps)
    tmp = folder / ".clusters.tmp.npz"
    np.savez_compressed(tmp, images=images, maps=maps.astype(np.uint8 if args.k <= 255 else np.int32), k=args.k)
    tmp.replace(folder / "clusters.npz")
    write_text_atomic(folder / "cluster_sizes.csv", pd.DataFrame(sizes).to_csv(index=False))
    save_figure(draw_grid(images, maps, names, args.k), pd.DataFrame(summary), folder / "clusters")
    write_meta(folder, {"analysis": NAME, **run_meta(prep), "maps": names, "k": args.k,
                        "images": [s.id for s in samples], "max_pixels": args.max_pixels, "iters": args.iters,
                        "kmeans_seed": derive_seed(seed, "kmeans"), "init": "k-means++", "inertia": inertias,
                        "features": "each map bilinearly sampled at every label pixel (what a probe sees), raw values"},
               device=p.device)
    print(folder / "clusters.png")
    return 0

