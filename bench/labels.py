"""Label maps: reading, validating and bringing them to the resolution they are scored at.

Labels are integer class-id maps (``name.npy`` as released, or a single-channel ``name_label.png``).
They are cast to uint8 as the official loader does, so a card may declare at most 256 ids in all
(``bench.cards`` refuses more); values the cast would wrap or truncate are refused by name.

Scoring resolution (see :mod:`bench.images` for the fit rules): a square label is nearest-resized
to the model resolution R as in the official code; with ``fit="stretch"`` a non-square label keeps
its own size; with ``fit="crop"`` its central square is cut out and then handled like a square one.

Example:
    >>> import numpy as np
    >>> nearest_resize(np.arange(4).reshape(2, 2), 4).tolist()[0]
    [0, 0, 1, 1]
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from bench.errors import DatasetError
from bench.images import PNG_LABEL_SUFFIX, check_fit, crop_box

if TYPE_CHECKING:  # pragma: no cover
    from bench.cards import DatasetCard
    from bench.samples import Sample

#: spec 5.3: a class with fewer pixels than this in a training image becomes ignore there
SMALL_CLASS_MIN_PIXELS = 20


def label_path(image: Path, label_format: str) -> Path:
    """Where the label of ``image`` lives: ``name.npy`` or ``name_label.png`` next to it.

    Example:
        >>> label_path(Path("a/b.jpg"), "png").as_posix()
        'a/b_label.png'
    """
    if label_format == "png":
        return image.with_name(image.stem + PNG_LABEL_SUFFIX)
    return image.with_suffix(".npy")


def read_label(path: Path, label_format: str) -> np.ndarray:
    """The raw array in the file (never unpickled); errors name the file."""
    try:
        if label_format == "npy":
            return np.load(path, allow_pickle=False)  # never unpickle: a label file is data only
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16", "1"):
                raise DatasetError(f"label {path} has mode {image.mode}; label PNGs must be single-channel ids")
            return np.array(image)
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read label {path}: {exc}") from exc


def nearest_resize(label: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """OpenCV INTER_NEAREST (the official label resize): source index floor(dst * src / dst).

    Example:
        >>> nearest_resize(np.array([[1, 2], [3, 4]]), 1, 2).tolist()
        [[1, 2]]
    """
    width = height if width is None else width
    src_h, src_w = label.shape
    rows = np.minimum((np.arange(height) * (src_h / height)).astype(np.int64), src_h - 1)
    cols = np.minimum((np.arange(width) * (src_w / width)).astype(np.int64), src_w - 1)
    return label[rows][:, cols]


def _show(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(v.item()) for v in values[:limit])
    return shown + (f", ... ({values.size} values)" if values.size > limit else "")


def score_shape(image_wh: tuple[int, int], resolution: int, fit: str) -> tuple[int, int]:
    """(height, width) at which an image of size ``image_wh`` is trained on and scored.

    Example:
        >>> score_shape((256, 256), 256, "stretch"), score_shape((500, 375), 256, "stretch")
        ((256, 256), (375, 500))
        >>> score_shape((500, 375), 256, "crop")
        (256, 256)
    """
    width, height = image_wh
    if width != height and check_fit(fit) == "stretch":
        return height, width
    return resolution, resolution


def load_label(sample: "Sample", card: "DatasetCard", fit: str = "stretch") -> np.ndarray:
    """int64 class ids at the scoring resolution (:func:`score_shape`), cast to uint8 like the official loader.

    The map must have its image's size and hold only ids 0..K-1 or the ignore label.

    Example:
        >>> from bench.data import get_card, dataset_root, list_samples
        >>> card = get_card("demo")
        >>> label = load_label(list_samples(card, dataset_root(card), "train")[0], card)
        >>> label.shape, label.dtype, int(label.max()) < card.num_classes
        ((64, 64), dtype('int64'), True)
    """
    from bench.images import image_size

    raw = read_label(sample.label, card.label_format)
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2:
        raise DatasetError(f"label {sample.label} has shape {raw.shape}; expected a 2-D map of class ids")
    if raw.dtype.kind not in "biuf":
        raise DatasetError(f"label {sample.label} has dtype {raw.dtype}; expected integer class ids")
    values = np.unique(raw)
    # The official uint8 cast would silently wrap or truncate these, so refuse them by name.
    if raw.dtype.kind == "f":
        odd = values[~np.isfinite(values) | (values != np.floor(values)) | (values < 0) | (values > 255)]
    else:
        odd = values[(values < 0) | (values > 255)]
    if odd.size:
        raise DatasetError(f"label {sample.label} holds values that are not uint8 class ids: {_show(odd)}")
    label = raw.astype(np.uint8)
    width, height = image_size(sample.image)
    if label.shape != (height, width):
        raise DatasetError(f"label {sample.label} is {label.shape[1]}x{label.shape[0]} but its image "
                           f"{sample.image} is {width}x{height}")
    ids = np.unique(label).astype(np.int64)
    bad = ids[(ids >= card.num_classes) & (ids != card.ignore_label)]
    if bad.size:
        raise DatasetError(f"label {sample.label} holds ids {_show(bad)} outside 0..{card.num_classes - 1} "
                           f"(ignore label {card.ignore_label})")
    if fit == "crop" and width != height:
        left, top, right, bottom = crop_box(width, height)
        label = label[top:bottom, left:right]
    shape = score_shape((width, height), card.resolution, fit)
    if label.shape != shape:
        label = nearest_resize(label, *shape)
    return label.astype(np.int64)


def training_label(label: np.ndarray, card: "DatasetCard") -> np.ndarray:
    """Spec 5.3: in a training label, a class with 1..19 pixels becomes the ignore label (test GT never).

    Example:
        >>> from bench.data import get_card
        >>> card = get_card("cat15")
        >>> label = np.zeros((8, 8), dtype=np.int64); label[0, :5] = 3; label[1:4, :] = 4  # 5 and 24 pixels
        >>> fixed = training_label(label, card)
        >>> int((fixed == 3).sum()), int((fixed == 255).sum()), int((fixed == 4).sum())
        (0, 5, 24)
    """
    out = np.array(label, dtype=np.int64, copy=True)
    in_range = out[(out >= 0) & (out < card.num_classes)]
    counts = np.bincount(in_range.ravel(), minlength=card.num_classes)
    for cls in range(card.num_classes):  # ascending, as in the official loop
        if cls != card.ignore_label and 0 < counts[cls] < SMALL_CLASS_MIN_PIXELS:
            out[out == cls] = card.ignore_label
    return out
