"""Image files: finding them, their size, decoding them into the square input a backbone sees.

The official pipeline needs square images and resizes them to the model resolution R with PIL's
bilinear resize. Photos people have are rarely square, so a *fit rule* says how any image becomes
the R x R model input (and, in :mod:`bench.labels`, at which resolution its label is scored):

- ``stretch`` (default): the whole image is resized to R x R (aspect ratio not kept). A square
  image follows the official pipeline exactly; a non-square one is scored at its label's own
  resolution (the native feature maps are sampled at each label pixel).
- ``crop``: the central square (side = the shorter side) of image and label is cut out first, then
  the official pipeline runs on it; pixels outside the crop are neither trained on nor scored.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "wide.png"
    >>> Image.new("RGB", (40, 20)).save(path)
    >>> read_rgb(path, 16).shape, read_rgb(path, 16, fit="crop").shape, crop_box(40, 20)
    ((16, 16, 3), (16, 16, 3), (10, 0, 30, 20))
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bench.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif")
#: PNG label maps sit next to their image as ``<stem>_label.png`` (never taken for an image)
PNG_LABEL_SUFFIX = "_label.png"
#: how a non-square image becomes the model's square input (see the module docstring)
FIT_RULES = ("stretch", "crop")


def check_fit(fit: str) -> str:
    """``fit`` if it is a known rule, else a one-line error naming the choices.

    Example:
        >>> check_fit("crop")
        'crop'
    """
    if fit not in FIT_RULES:
        raise DatasetError(f"unknown fit rule {fit!r}; use one of {', '.join(FIT_RULES)}")
    return fit


def find_images(folder: Path) -> list[Path]:
    """Images under ``folder`` (recursive), sorted like the official loader sorts full paths.

    Example:
        >>> import tempfile
        >>> find_images(Path(tempfile.mkdtemp()))
        []
    """
    found = [
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(PNG_LABEL_SUFFIX) and p.is_file()
    ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.png"; Image.new("RGB", (5, 3)).save(p)
        >>> image_size(p)
        (5, 3)
    """
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The central square ``(left, top, right, bottom)`` of a ``width x height`` image.

    Example:
        >>> crop_box(500, 375)
        (62, 0, 437, 375)
    """
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def read_rgb(path: Path, size: int | None = None, *, fit: str = "stretch") -> np.ndarray:
    """Decode an image as uint8 ``[size, size, 3]`` RGB following the ``fit`` rule.

    ``size=None`` keeps the (cropped, for ``crop``) image's own size, which must then be square.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.png"; Image.new("RGB", (8, 8)).save(p)
        >>> read_rgb(p).shape
        (8, 8, 3)
    """
    check_fit(fit)
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")  # decodes here, so a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    width, height = image.size
    if fit == "crop" and width != height:
        image = image.crop(crop_box(width, height))
        width, height = image.size
    if size is None:
        if width != height:
            raise DatasetError(f"image {path} is {width}x{height}; give a size to resize it to a square")
        size = width
    if (width, height) != (size, size):
        # The torchvision Resize the official code uses is PIL's bilinear resize on PIL images.
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)


def verify_image(path: Path) -> tuple[int, int]:
    """Decode ``path`` fully (a truncated file fails here, not hours later); returns (width, height).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.png"; Image.new("RGB", (4, 6)).save(p)
        >>> verify_image(p)
        (4, 6)
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
