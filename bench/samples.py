"""Dataset files: where a dataset lives, its labelled samples, and unlabelled images for pretraining.

The files follow the official layout (spec 1.4): images under ``real/train`` and ``real/test``,
found recursively, sorted lexicographically and cut to the first N; the label of ``name.ext`` is
``name.npy`` (or ``name_label.png``). :func:`validate_samples` reads every file of a split before
any long work starts, so a broken test label fails in seconds, not after training.

Example:
    >>> from bench.cards import get_card
    >>> card = get_card("demo")
    >>> [s.id for s in list_samples(card, dataset_root(card), "test")][:2]
    ['real/test/0000.png', 'real/test/0001.png']
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.cards import USER_CARD_FILE, DatasetCard, _named_card, get_card, list_cards
from bench.errors import DatasetError
from bench.images import find_images, read_rgb, verify_image
from bench.labels import label_path, load_label


# ---- where the files are ----------------------------------------------------------------------------

def _datasets_home() -> Path:
    from bench.hub import cache_dir  # the one cache root, owned by bench.hub

    return cache_dir("datasets")


def dataset_root(card: DatasetCard) -> Path:
    """The folder holding ``card``'s files; the demo is generated there on first use.

    Paper sets live in ``<cache>/datasets/<folder>`` (or ``<cache>/datasets/datasets/<folder>``, as the
    tarball's top folder is unverified); a missing one says how to download it.

    Example:
        >>> dataset_root(get_card("demo")).name
        'demo'
    """
    if card.path is not None:
        if not card.path.is_dir():
            raise DatasetError(f"dataset folder {card.path} does not exist")
        return card.path
    home = _datasets_home()
    if card.generator == "demo":
        from bench import demo

        return demo.materialise(home / (card.folder or card.name), n_train=card.train, n_test=card.test,
                                size=card.resolution)
    folder = card.folder or card.name
    candidates = [home / folder, home / "datasets" / folder]
    for root in candidates:
        if (root / card.train_dir).is_dir():
            return root
    raise DatasetError(f"dataset {card.name!r} is not downloaded; run `bench download --dataset {card.name}` "
                       f"(looked in {' and '.join(str(c) for c in candidates)})")


def download_dataset(card: DatasetCard, *, progress: bool = True) -> Path:
    """Fetch (or generate) ``card``'s files into the cache and return :func:`dataset_root`.

    The paper sets share one tarball: it is downloaded to ``<cache>/downloads/`` (sha256-checked when
    the card has one) and safely extracted into ``<cache>/datasets``.

    Example:
        >>> download_dataset(get_card("demo"), progress=False).name
        'demo'
    """
    if card.path is not None or card.generator:
        return dataset_root(card)
    try:
        return dataset_root(card)
    except DatasetError:
        pass  # not there yet: download it
    if not card.url:
        raise DatasetError(f"dataset {card.name!r} has no download url in its card")
    from bench import hub

    name = Path(card.url.split("?", 1)[0]).name or "datasets.tar.gz"
    archive = hub.download(card.url, hub.cache_dir("downloads") / name, sha256=card.sha256, progress=progress)
    target = hub.cache_dir("datasets")
    hub.safe_extract(archive, target)
    try:
        return dataset_root(card)
    except DatasetError as exc:
        raise DatasetError(f"extracted {archive} into {target} but found no folder "
                           f"{card.folder or card.name!r} with {card.train_dir}: {exc}") from exc

@dataclass(frozen=True)
class Sample:
    """One labeled image; ``id`` is the image path relative to the dataset root, in posix form.

    Example:
        >>> Sample(id="real/train/0000.png", image=Path("/d/real/train/0000.png"),
        ...        label=Path("/d/real/train/0000.npy")).id
        'real/train/0000.png'
    """

    id: str
    image: Path
    label: Path


def list_samples(card: DatasetCard, root: Path, part: str) -> list[Sample]:
    """The released ``part`` ("train"/"test"): images sorted lexicographically, the first N (spec 1.4).

    Example:
        >>> card = get_card("demo")
        >>> [s.id for s in list_samples(card, dataset_root(card), "test")][:2]
        ['real/test/0000.png', 'real/test/0001.png']
    """
    if part not in ("train", "test"):
        raise DatasetError(f"part must be 'train' or 'test', got {part!r}")
    root = Path(root)
    folder = root / (card.train_dir if part == "train" else card.test_dir)
    wanted = card.train if part == "train" else card.test
    if not folder.is_dir():
        raise DatasetError(f"dataset {card.name!r}: {part} folder {folder} does not exist")
    images = find_images(folder)
    if not images:
        raise DatasetError(f"dataset {card.name!r}: no images (jpg, jpeg, png, gif) in {part} folder {folder}")
    if len(images) < wanted:
        raise DatasetError(f"dataset {card.name!r}: the card asks for {wanted} {part} images but {folder} "
                           f"holds only {len(images)}")
    samples = []
    for image in images[:wanted]:
        label = label_path(image, card.label_format)
        if not label.is_file():
            raise DatasetError(f"dataset {card.name!r}: label file {label} for image {image} is missing")
        samples.append(Sample(id=image.relative_to(root).as_posix(), image=image, label=label))
    return samples


def load_image(sample: Sample, card: DatasetCard, fit: str = "stretch") -> np.ndarray:
    """uint8 ``[R, R, 3]`` RGB: the model's square input, by the ``fit`` rule (:mod:`bench.images`).

    Example:
        >>> card = get_card("demo")
        >>> load_image(list_samples(card, dataset_root(card), "train")[0], card).shape
        (64, 64, 3)
    """
    return read_rgb(sample.image, card.resolution, fit=fit)


def validate_samples(samples: Sequence[Sample], card: DatasetCard, fit: str = "stretch") -> None:
    """Read every image and label of a split, so that a broken file fails before any work starts.

    Each image is decoded in full (a truncated file fails here) and each label passes every check
    of :func:`bench.labels.load_label` (2-D, integer ids in range, the image's size).

    Example:
        >>> card = get_card("demo")
        >>> validate_samples(list_samples(card, dataset_root(card), "test")[:2], card)
    """
    for sample in samples:
        verify_image(sample.image)
        load_label(sample, card, fit)


# ---- unlabeled images for pretraining ----------------------------------------------------------------

class FolderImages(Sequence[np.ndarray]):
    """Every image under a folder (recursive, sorted), decoded on access as uint8 ``[H, W, 3]``.

    Example:
        >>> import tempfile; from PIL import Image
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (32, 32)).save(folder / "x.jpg")
        >>> images = FolderImages(folder, size=16)
        >>> len(images), images[0].shape
        (1, (16, 16, 3))
    """

    def __init__(self, folder: Path, size: int | None = None) -> None:
        self.folder, self.size = Path(folder), size
        self.files = find_images(self.folder)
        if not self.files:
            raise DatasetError(f"no images (jpg, jpeg, png, gif) in {self.folder}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        # Pretraining wants the whole square: a non-square photo gives its central square.
        return read_rgb(self.files[index], self.size, fit="crop")


def unlabeled_images(dataset: str | DatasetCard, *, size: int | None = None) -> Sequence[np.ndarray]:
    """Unlabeled images to pretrain a backbone on: the demo's endless generator, or a folder of images.

    The paper sets ship no pretraining images (their checkpoints were trained on LSUN / FFHQ), so
    asking for one names the alternative.

    Example:
        >>> images = unlabeled_images("demo")
        >>> len(images) >= 10**6, images[0].shape
        (True, (64, 64, 3))
    """
    if isinstance(dataset, DatasetCard):
        card = dataset
    else:
        text = str(dataset)
        path = Path(text).expanduser()
        is_name = _named_card(text, list_cards()) is not None  # a built-in name wins, as in get_card
        if not is_name and path.is_dir() and not (path / USER_CARD_FILE).is_file():
            return FolderImages(path, size)
        card = get_card(text)
    if card.generator == "demo":
        from bench import demo

        # Drawn on access, so "unlimited in practice"; seeds never reach the labeled ones.
        return demo.UnlabeledImages(10**9, 0, size or card.resolution)
    if card.path is not None:
        return FolderImages(card.path, size or card.resolution)
    raise DatasetError(f"dataset {card.name!r} has no unlabeled pretraining images (its checkpoints were "
                       f"trained on {card.domain or 'other data'}); pass a folder of images instead")
