"""Segmentation metrics: the official and the standard mIoU (spec §7), streamed over a test set.

Both variants are computed from one exact integer confusion matrix, accumulated image by image, so a
test set of any size costs ``(K + 1) x K`` integers of memory and never holds all predictions.

Rows are ground-truth ids 0..K-1 plus one extra row K for ``ignore_label``, wherever that id lies
(255, or a real id such as Bedroom-28's background 0); columns are predicted ids 0..K-1.

- **official** (§7.1, what the paper reports): ignore pixels are *not* masked, so a pixel with
  gt = ignore and pred = c is a false positive of c; IoU_c = I_c / (U_c + 1e-8); a class absent from
  both gt and prediction scores 0 and still counts in the mean.
- **standard** (§7.2, reported alongside): gt = ignore pixels are dropped first; classes with
  U_c = 0 are NaN in the per-class vector and excluded from the mean; no 1e-8 term.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from bench.errors import BenchError

VARIANTS = ("official", "standard")
_OFFICIAL_EPS = 1e-8  # the official code's guard, kept so our numbers match its to ~1e-8


def _as_int_array(values: Any, what: str) -> np.ndarray:
    """numpy or torch integer labels -> an int64 numpy array (torch tensors are moved to the CPU)."""
    if hasattr(values, "detach"):  # a torch tensor; avoids importing torch for numpy users
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.integer):
        raise BenchError(f"{what} must hold integer class ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown mIoU variant {variant!r}; expected one of {', '.join(VARIANTS)}")


class ConfusionMatrix:
    """Exact ``int64`` pixel counts ``[gt row, predicted id]`` accumulated over a test set.

    Example:
        >>> import numpy as np
        >>> cm = ConfusionMatrix(num_classes=3, ignore_label=0)
        >>> cm.update(np.array([1, 1, 2, 2]), np.array([0, 1, 1, 2]))
        >>> round(cm.miou("official"), 6), cm.miou("standard")
        (0.416667, 0.5)
    """

    def __init__(self, num_classes: int, ignore_label: int) -> None:
        if num_classes < 1:
            raise BenchError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        # Row K collects every gt = ignore pixel, so an ignore id inside 0..K-1 (Bedroom's 0) never
        # lands in that class's own row.
        self.counts = np.zeros((self.num_classes + 1, self.num_classes), dtype=np.int64)

    def update(self, pred: Any, gt: Any) -> None:
        """Add one image (or any batch of pixels): integer label maps of equal shape.

        Example:
            >>> import numpy as np
            >>> cm = ConfusionMatrix(num_classes=2, ignore_label=255)
            >>> cm.update(np.array([[0, 1]]), np.array([[0, 255]]))
            >>> int(cm.counts.sum())
            2
        """
        pred_arr = _as_int_array(pred, "pred")
        gt_arr = _as_int_array(gt, "gt")
        if pred_arr.shape != gt_arr.shape:
            raise BenchError(
                f"pred and gt shapes differ: pred {tuple(pred_arr.shape)} vs gt {tuple(gt_arr.shape)}"
            )
        k = self.num_classes
        pred_arr, gt_arr = pred_arr.ravel(), gt_arr.ravel()
        if pred_arr.size == 0:
            return
        bad_pred = (pred_arr < 0) | (pred_arr >= k)
        if bad_pred.any():
            raise BenchError(f"pred holds class id {int(pred_arr[bad_pred][0])}, outside 0..{k - 1}")
        is_ignore = gt_arr == self.ignore_label
        bad_gt = ~is_ignore & ((gt_arr < 0) | (gt_arr >= k))
        if bad_gt.any():
            raise BenchError(
                f"gt holds class id {int(gt_arr[bad_gt][0])}, outside 0..{k - 1} "
                f"and not the ignore label {self.ignore_label}"
            )
        gt_row = np.where(is_ignore, k, gt_arr)
        flat = np.bincount(gt_row * k + pred_arr, minlength=(k + 1) * k)
        self.counts += flat.reshape(k + 1, k)

    def _class_ids(self, class_ids: Iterable[int] | None) -> np.ndarray:
        if class_ids is None:
            return np.array([c for c in range(self.num_classes) if c != self.ignore_label], dtype=np.int64)
        ids = np.asarray(list(class_ids), dtype=np.int64)
        for c in ids.tolist():
            if not 0 <= c < self.num_classes or c == self.ignore_label:
                raise BenchError(
                    f"class_ids holds {c}: must be in 0..{self.num_classes - 1} and not the "
                    f"ignore label {self.ignore_label}"
                )
        return ids

    def iou(self, variant: str = "official", class_ids: Iterable[int] | None = None) -> np.ndarray:
        """Per-class IoU (fractions) for ``class_ids`` in the given order (default: all but ignore).

        Example:
            >>> import numpy as np
            >>> cm = ConfusionMatrix(num_classes=3, ignore_label=255)
            >>> cm.update(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 255]))
            >>> cm.iou("official").round(6).tolist(), cm.iou("standard").tolist()
            ([1.0, 0.5, 0.0], [1.0, 1.0, nan])
        """
        _check_variant(variant)
        ids = self._class_ids(class_ids)
        k = self.num_classes
        labelled = self.counts[:k]  # rows of real gt ids
        intersection = np.diagonal(labelled).astype(np.float64)
        gt_count = labelled.sum(axis=1)
        if variant == "official":
            # Column sums include row K: a gt = ignore pixel predicted as c widens c's union.
            union = gt_count + self.counts.sum(axis=0) - intersection
            return (intersection / (union + _OFFICIAL_EPS))[ids]
        union = gt_count + labelled.sum(axis=0) - intersection
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
        return per_class[ids]

    def miou(self, variant: str = "official", class_ids: Iterable[int] | None = None) -> float:
        """Mean IoU as a fraction in [0, 1]; the standard variant skips classes with an empty union.

        Returns NaN for the standard variant when no counted class has any pixel.

        Example:
            >>> import numpy as np
            >>> cm = ConfusionMatrix(num_classes=3, ignore_label=255)
            >>> cm.update(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 255]))
            >>> round(cm.miou("official"), 6), cm.miou("standard")
            (0.5, 1.0)
        """
        per_class = self.iou(variant, class_ids)
        if variant == "official":
            return float(per_class.mean()) if per_class.size else float("nan")
        counted = per_class[~np.isnan(per_class)]
        return float(counted.mean()) if counted.size else float("nan")


def _accumulate(preds: Sequence[Any], gts: Sequence[Any], num_classes: int, ignore_label: int) -> ConfusionMatrix:
    preds, gts = list(preds), list(gts)
    if len(preds) != len(gts):
        raise BenchError(f"got {len(preds)} predictions for {len(gts)} ground-truth maps")
    matrix = ConfusionMatrix(num_classes, ignore_label)
    for pred, gt in zip(preds, gts):
        matrix.update(pred, gt)
    return matrix


def miou(
    preds: Sequence[Any],
    gts: Sequence[Any],
    *,
    num_classes: int,
    ignore_label: int,
    variant: str = "official",
    class_ids: Iterable[int] | None = None,
) -> float:
    """Dataset-level mIoU (fraction) of label maps ``preds`` against ``gts`` (pooled, not per-image).

    Example:
        >>> import numpy as np
        >>> round(miou([np.array([1, 1, 2, 2])], [np.array([0, 1, 1, 2])], num_classes=3, ignore_label=0), 6)
        0.416667
    """
    _check_variant(variant)
    return _accumulate(preds, gts, num_classes, ignore_label).miou(variant, class_ids)


def per_class_iou(
    preds: Sequence[Any],
    gts: Sequence[Any],
    *,
    num_classes: int,
    ignore_label: int,
    variant: str = "official",
    class_ids: Iterable[int] | None = None,
) -> np.ndarray:
    """Dataset-level IoU per class in ``class_ids`` order (default: every id except ignore).

    Example:
        >>> import numpy as np
        >>> per_class_iou([np.array([1, 1, 2, 2])], [np.array([0, 1, 1, 2])], num_classes=3,
        ...               ignore_label=0, variant="standard").tolist()
        [0.5, 0.5]
    """
    _check_variant(variant)
    return _accumulate(preds, gts, num_classes, ignore_label).iou(variant, class_ids)
