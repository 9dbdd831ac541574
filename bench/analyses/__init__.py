"""The paper's analyses, one module each, run as ``bench analyze NAME ...``.

Each module named in :data:`ANALYSES` defines::

    HELP: str                                          # one line for ``bench analyze --help``
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def main(args: argparse.Namespace) -> int          # writes under <out>/analyses/<dataset>/<NAME>/

and writes, per figure, ``<stem>.csv`` (the numbers behind it) and ``<stem>.png`` through
:func:`bench.figures.save_figure`, plus a ``meta.json`` (what produced it: dataset, split seeds,
backbone config, settings, code version). ``bench report`` gathers these folders into its page.
Modules load only when their analysis is asked for (heavy imports stay out of ``bench --help``).

Example:
    >>> "sweep" in ANALYSES
    True
"""
from __future__ import annotations

# name -> (module, where in the paper). Order is the paper's.
ANALYSES: dict[str, tuple[str, str]] = {
    "sweep": ("bench.analyses.sweep", "Fig. 2-3: mIoU per (block, noise step), small vs large classes"),
    "clusters": ("bench.analyses.clusters", "Fig. 4: k-means maps of per-pixel features"),
    "masks": ("bench.analyses.masks", "Fig. 5: image, ground truth, prediction, uncertainty"),
    "robustness": ("bench.analyses.robustness", "Fig. 6: mIoU under common corruptions, severities 1-5"),
    "efficiency": ("bench.analyses.efficiency", "Table 4: mIoU against the number of labelled images"),
    "noise": ("bench.analyses.noise", "Table 5: shared / fresh-per-step / fresh-at-test noise"),
    "mlp": ("bench.analyses.mlp", "Table 7: MLP width and depth"),
    "classes": ("bench.analyses.classes", "Fig. 9-10: per-class IoU bars and class statistics"),
}
