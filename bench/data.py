"""Datasets: cards, files on disk, splits, and loading of images and label maps.

A *card* (``datasets/<name>.json``, or ``card.json`` in a user's folder) says what a dataset is:
class names in id order, the ignore label, which ids the official mIoU counts, train/test sizes,
resolution, domain (which picks checkpoint tags), where to download it. The files follow the
official layout (spec 1.4): images under ``real/train`` and ``real/test``, found recursively,
sorted lexicographically and cut to the first N; the label of ``name.ext`` is ``name.npy``.

Example:
    >>> card = get_card("Cat-15")
    >>> card.name, card.num_classes, card.ignore_label, len(card.miou_class_ids)
    ('cat_15', 15, 255, 15)
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from bench.errors import BenchError, DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif")
#: PNG label maps sit next to their image as ``<stem>_label.png`` (never taken for an image)
PNG_LABEL_SUFFIX = "_label.png"
#: spec 5.3: a class with fewer pixels than this in a training image becomes ignore there
SMALL_CLASS_MIN_PIXELS = 20
USER_CARD_FILE = "card.json"


@dataclass(frozen=True)
class DatasetCard:
    """What a dataset is: classes, ignore label, counted classes, sizes, source.

    ``path`` is set for a user's own dataset folder (its files live there, not in the cache).

    Example:
        >>> card = DatasetCard(name="toy", aliases=(), title="Toy", classes=("bg", "cat"), ignore_label=255,
        ...                    miou_class_ids=(0, 1), train=2, test=2, resolution=64, domain="")
        >>> card.num_classes, card.to_json()["num_classes"]
        (2, 2)
    """

    name: str
    aliases: tuple[str, ...]
    title: str
    classes: tuple[str, ...]
    ignore_label: int
    miou_class_ids: tuple[int, ...]
    train: int
    test: int
    resolution: int
    domain: str
    url: str = ""
    sha256: str = ""
    license: str = ""
    folder: str = ""
    train_dir: str = "real/train"
    test_dir: str = "real/test"
    label_format: str = "npy"
    generator: str = ""
    paper_table: str = ""
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        """K: the number of class ids (the probe's output size)."""
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field plus ``num_classes`` (what ``bench ls datasets --json`` prints).

        Example:
            >>> get_card("cat15").to_json()["miou_class_ids"][:3]
            [0, 1, 2]
        """
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        out["path"] = str(self.path) if self.path is not None else None
        out["num_classes"] = self.num_classes
        return out


# ---- reading and validating cards ----------------------------------------------------------------------

_FIELD_NAMES = [f.name for f in fields(DatasetCard) if f.name != "path"]
_REQUIRED = ("name", "title", "classes", "ignore_label", "miou_class_ids", "train", "test", "resolution", "domain")
_STRINGS = ("name", "title", "domain", "url", "sha256", "license", "folder", "train_dir", "test_dir",
            "label_format", "generator", "paper_table")
_GENERATORS = ("", "demo")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_known_keys(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise DatasetError(f"dataset card {source} must be a JSON object, got {type(data).__name__}")
    unknown = [k for k in data if k not in _FIELD_NAMES and k != "num_classes"]
    if unknown:
        close = difflib.get_close_matches(unknown[0], _FIELD_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(f"dataset card {source}: unknown key {unknown[0]!r}{hint}; known keys: "
                           f"{', '.join(_FIELD_NAMES)}")


def _card_from_mapping(data: Any, source: str, *, path: Path | None = None) -> DatasetCard:
    """Validate a parsed card (all keys known, types, ranges) and build the dataclass."""
    _check_known_keys(data, source)
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise DatasetError(f"dataset card {source}: missing key {missing[0]!r}")

    def bad(key: str, why: str) -> DatasetError:
        return DatasetError(f"dataset card {source}: {key!r} {why}, got {data.get(key)!r}")

    for key in _STRINGS:
        if key in data and not isinstance(data[key], str):
            raise bad(key, "must be a string")
    for key in ("aliases", "classes"):
        if not isinstance(data.get(key, []), list) or not all(isinstance(v, str) for v in data.get(key, [])):
            raise bad(key, "must be a list of strings")
    classes = tuple(data["classes"])
    if not classes:
        raise bad("classes", "must name at least one class")
    k = len(classes)
    if "num_classes" in data and data["num_classes"] != k:
        raise bad("num_classes", f"must equal the number of classes ({k})")
    ignore = data["ignore_label"]
    # Labels are stored as uint8 (as in the official loader): the ignore id is a class id or 255-style id >= K.
    if not _is_int(ignore) or not 0 <= ignore <= 255:
        raise bad("ignore_label", "must be an integer in 0..255")
    ids = data["miou_class_ids"]
    if not isinstance(ids, list) or not all(_is_int(i) and 0 <= i < k for i in ids) or len(set(ids)) != len(ids):
        raise bad("miou_class_ids", f"must be distinct class ids in 0..{k - 1}")
    for key in ("train", "test", "resolution"):
        if not _is_int(data[key]) or data[key] < 1:
            raise bad(key, "must be a positive integer")
    if data.get("label_format", "npy") not in ("npy", "png"):
        raise bad("label_format", "must be 'npy' or 'png'")
    if data.get("generator", "") not in _GENERATORS:
        raise bad("generator", f"must be one of {_GENERATORS}")
    sha = data.get("sha256", "")
    if sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise bad("sha256", "must be empty or 64 lower-case hex digits")
    values = {key: data[key] for key in _FIELD_NAMES if key in data}
    values.update(aliases=tuple(data.get("aliases", [])), classes=classes, miou_class_ids=tuple(ids), path=path)
    return DatasetCard(**values)


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetError(f"cannot read dataset card {file}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"dataset card {file} is not valid JSON: {exc}") from exc


def cards_dir() -> Path:
    """The folder of the built-in cards: the repository's ``datasets/`` (or ``$BENCH_DATASETS_DIR``).

    Example:
        >>> (cards_dir() / "cat_15.json").is_file()
        True
    """
    override = os.environ.get("BENCH_DATASETS_DIR", "").strip()
    if override:
        return Path(override).expanduser()
    import bench

    return Path(bench.__file__).resolve().parents[1] / "datasets"


def _normalise(name: str) -> str:
    """Case, spaces, '-' and '_' do not matter: "Cat-15", "cat_15" and "cat15" are one name."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def list_cards() -> list[DatasetCard]:
    """Every built-in card, sorted by name.

    Example:
        >>> [c.name for c in list_cards()][:3]
        ['ade_bedroom_30', 'bedroom_28', 'cat_15']
    """
    folder = cards_dir()
    if not folder.is_dir():
        raise DatasetError(f"dataset card folder {folder} does not exist (set BENCH_DATASETS_DIR?)")
    cards, owners = [], {}
    for file in sorted(folder.glob("*.json")):
        card = _card_from_mapping(_read_json(file), str(file))
        if card.name != file.stem:
            raise DatasetError(f"dataset card {file}: name {card.name!r} must equal the file name {file.stem!r}")
        for key in {_normalise(n) for n in (card.name, *card.aliases)}:
            if key in owners:
                raise DatasetError(f"dataset name/alias {key!r} is claimed by both {owners[key]} and {file}")
            owners[key] = file
        cards.append(card)
    return sorted(cards, key=lambda c: c.name)


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith((".", "~"))


def _named_card(text: str, cards: list[DatasetCard]) -> DatasetCard | None:
    if _looks_like_path(text):
        return None
    wanted = _normalise(text)
    for card in cards:
        if wanted in {_normalise(n) for n in (card.name, *card.aliases)}:
            return card
    return None


def get_card(name_or_path: str) -> DatasetCard:
    """A card by name or alias (case, '-' and '_' ignored), or a user's folder holding ``card.json``.

    A built-in name wins over a folder of the same name in the working directory; write ``./name``
    to mean the folder.

    Example:
        >>> get_card("cat-15").name == get_card("CAT15").name == "cat_15"
        True
    """
    text = str(name_or_path)
    cards = list_cards()
    named = _named_card(text, cards)
    if named is not None:
        return named
    path = Path(text).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        return load_user_card(path)
    if _looks_like_path(text):
        raise DatasetError(f"dataset folder {path} does not exist")
    known = sorted({n for c in cards for n in (c.name, *c.aliases)})
    close = difflib.get_close_matches(text.lower(), known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise DatasetError(f"unknown dataset {text!r}{hint} (known: {', '.join(c.name for c in cards)}; "
                       f"or give a folder with a {USER_CARD_FILE})")


def load_user_card(folder_or_file: Path) -> DatasetCard:
    """The card of a user's dataset folder; only ``classes`` and ``ignore_label`` are required.

    Defaults: name = folder name, train/test dirs ``train``/``test``, train/test = number of images
    found there, resolution = the first training image's size, miou_class_ids = every id except the
    ignore label, label_format = ``npy`` if any ``.npy`` file is in the train folder, else ``png``
    (``<stem>_label.png`` next to each image).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for part in ("train", "test"):
        ...     (root / part).mkdir()
        ...     Image.new("RGB", (8, 8)).save(root / part / "a.png")
        ...     np.save(root / part / "a.npy", np.zeros((8, 8), np.uint8))
        >>> _ = (root / "card.json").write_text('{"classes": ["bg", "cat"], "ignore_label": 255}')
        >>> card = load_user_card(root)
        >>> card.train, card.resolution, card.label_format, card.miou_class_ids
        (1, 8, 'npy', (0, 1))
    """
    given = Path(folder_or_file)
    file = given if given.is_file() else given / USER_CARD_FILE
    root = file.parent.resolve()
    if not file.is_file():
        raise DatasetError(f"dataset folder {given} has no {USER_CARD_FILE}; a user dataset needs one with at "
                           f"least {{\"classes\": [...], \"ignore_label\": 255}}")
    data = _read_json(file)
    _check_known_keys(data, str(file))  # a misspelt key first: it may explain everything below
    data = dict(data)
    for key in ("classes", "ignore_label"):
        if key not in data:
            raise DatasetError(f"dataset card {file}: missing key {key!r}")
    data.setdefault("name", root.name)
    data.setdefault("title", data["name"])
    data.setdefault("domain", "")
    data.setdefault("train_dir", "train")
    data.setdefault("test_dir", "test")
    if isinstance(data["classes"], list) and _is_int(data["ignore_label"]):
        data.setdefault("miou_class_ids", [i for i in range(len(data["classes"])) if i != data["ignore_label"]])
    dirs = {part: root / str(data[f"{part}_dir"]) for part in ("train", "test")}
    if "label_format" not in data:
        has_npy = dirs["train"].is_dir() and any(dirs["train"].rglob("*.npy"))
        data["label_format"] = "npy" if has_npy else "png"
    found = {part: _find_images(folder) if folder.is_dir() else [] for part, folder in dirs.items()}
    for part in ("train", "test"):
        if part not in data:
            if not found[part]:
                raise DatasetError(f"dataset {root}: no images (jpg, jpeg, png, gif) in {dirs[part]}")
            data[part] = len(found[part])
    if "resolution" not in data:
        first = found["train"][0] if found["train"] else None
        if first is None:
            raise DatasetError(f"dataset {root}: no images in {dirs['train']} to take the resolution from")
        width, height = _image_size(first)
        if width != height:
            raise DatasetError(f"image {first} is {width}x{height}; images must be square")
        data["resolution"] = width
    return _card_from_mapping(data, str(file), path=root)


# ---- where the files are ----------------------------------------------------------------------------

def _bench_home() -> Path:
    from bench.hub import bench_home  # the one cache root, owned by bench.hub

    return bench_home()


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
    home = _bench_home() / "datasets"
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

    home = hub.bench_home()
    name = Path(card.url.split("?", 1)[0]).name or "datasets.tar.gz"
    archive = hub.download(card.url, home / "downloads" / name, sha256=card.sha256, progress=progress)
    hub.safe_extract(archive, home / "datasets")
    try:
        return dataset_root(card)
    except DatasetError as exc:
        raise DatasetError(f"extracted {archive} into {home / 'datasets'} but found no folder "
                           f"{card.folder or card.name!r} with {card.train_dir}: {exc}") from exc


# ---- samples and splits -----------------------------------------------------------------------------

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


def _find_images(folder: Path) -> list[Path]:
    """Images under ``folder`` (recursive), sorted like the official loader sorts full paths."""
    found = [
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(PNG_LABEL_SUFFIX) and p.is_file()
    ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _label_path(image: Path, label_format: str) -> Path:
    if label_format == "png":
        return image.with_name(image.stem + PNG_LABEL_SUFFIX)
    return image.with_suffix(".npy")


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
    images = _find_images(folder)
    if not images:
        raise DatasetError(f"dataset {card.name!r}: no images (jpg, jpeg, png, gif) in {part} folder {folder}")
    if len(images) < wanted:
        raise DatasetError(f"dataset {card.name!r}: the card asks for {wanted} {part} images but {folder} "
                           f"holds only {len(images)}")
    samples = []
    for image in images[:wanted]:
        label = _label_path(image, card.label_format)
        if not label.is_file():
            raise DatasetError(f"dataset {card.name!r}: label file {label} for image {image} is missing")
        samples.append(Sample(id=image.relative_to(root).as_posix(), image=image, label=label))
    return samples


def derive_seed(seed: int, stream: str, index: int = 0) -> int:
    """A stable 63-bit sub-seed for one use of the run seed (``"split"``, ``"noise"``, ``"member"`` m, ...).

    Defined as the first 8 bytes (big-endian) of ``sha256(f"bench/{stream}/{seed}/{index}")``,
    shifted right by one bit. Independent of platform, Python and NumPy versions, and of the order in
    which streams are used, so one member or one split can be recomputed alone.

    Example:
        >>> derive_seed(0, "split") == derive_seed(0, "split") != derive_seed(1, "split")
        True
        >>> 0 <= derive_seed(3, "member", 9) < 2**63
        True
    """
    if not _is_int(seed) or not _is_int(index):
        raise BenchError(f"seed and index must be integers, got seed={seed!r} index={index!r}")
    digest = hashlib.sha256(f"bench/{stream}/{seed}/{index}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def make_split(card: DatasetCard, root: Path, seed: int | None) -> tuple[list[Sample], list[Sample]]:
    """The train and test samples: the released split (``seed=None``) or re-split ``seed``.

    "bench split v1": pool the released train and test samples; sort their ids in byte order (UTF-8);
    permute with ``numpy.random.Generator(numpy.random.PCG64(derive_seed(seed, "split"))).permutation``;
    train = the first ``card.train``, test = the next ``card.test``; sort each part again by id.

    Example:
        >>> card = get_card("demo"); root = dataset_root(card)
        >>> train, test = make_split(card, root, 0)
        >>> len(train), len(test), make_split(card, root, 0)[0] == train
        (20, 20, True)
    """
    train, test = list_samples(card, root, "train"), list_samples(card, root, "test")
    if seed is None:
        return train, test
    if not _is_int(seed) or seed < 0:
        raise BenchError(f"split seed must be a non-negative integer or None, got {seed!r}")

    def byte_order(s: Sample) -> bytes:
        return s.id.encode("utf-8")

    pool = sorted(train + test, key=byte_order)
    if len({s.id for s in pool}) != len(pool):
        raise DatasetError(f"dataset {card.name!r}: train and test folders share images; cannot re-split")
    order = np.random.Generator(np.random.PCG64(derive_seed(seed, "split"))).permutation(len(pool))
    picked = [pool[i] for i in order]
    return (sorted(picked[: card.train], key=byte_order),
            sorted(picked[card.train: card.train + card.test], key=byte_order))


# ---- loading ------------------------------------------------------------------------------------------

def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def read_rgb(path: Path, size: int | None = None) -> np.ndarray:
    """Decode a square image as uint8 ``[size, size, 3]`` RGB (bilinear PIL resize when ``size`` differs).

    Example:
        >>> card = get_card("demo")
        >>> read_rgb(list_samples(card, dataset_root(card), "train")[0].image).shape
        (64, 64, 3)
    """
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")  # decodes here, so a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    width, height = image.size
    if width != height:
        raise DatasetError(f"image {path} is {width}x{height}; images must be square")
    if size is not None and width != size:
        # The torchvision Resize the official code uses is PIL's bilinear resize on PIL images.
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)


def load_image(sample: Sample, card: DatasetCard) -> np.ndarray:
    """uint8 ``[R, R, 3]`` RGB; square images only, resized bilinearly (PIL) to ``card.resolution``.

    Example:
        >>> card = get_card("demo")
        >>> load_image(list_samples(card, dataset_root(card), "train")[0], card).shape
        (64, 64, 3)
    """
    return read_rgb(sample.image, card.resolution)


def _read_label(path: Path, label_format: str) -> np.ndarray:
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


def _nearest_resize(label: np.ndarray, size: int) -> np.ndarray:
    """OpenCV INTER_NEAREST (the official label resize): source index floor(dst * src / dst)."""
    height, width = label.shape
    rows = np.minimum((np.arange(size) * (height / size)).astype(np.int64), height - 1)
    cols = np.minimum((np.arange(size) * (width / size)).astype(np.int64), width - 1)
    return label[rows][:, cols]


def load_label(sample: Sample, card: DatasetCard) -> np.ndarray:
    """int64 ``[R, R]`` class ids; cast to uint8 like the official loader, nearest-resized to R.

    The map must have its image's size and hold only ids 0..K-1 or the ignore label.

    Example:
        >>> card = get_card("demo")
        >>> label = load_label(list_samples(card, dataset_root(card), "train")[0], card)
        >>> label.shape, label.dtype, int(label.max()) < card.num_classes
        ((64, 64), dtype('int64'), True)
    """
    raw = _read_label(sample.label, card.label_format)
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
    width, height = _image_size(sample.image)
    if label.shape != (height, width):
        raise DatasetError(f"label {sample.label} is {label.shape[1]}x{label.shape[0]} but its image "
                           f"{sample.image} is {width}x{height}")
    ids = np.unique(label).astype(np.int64)
    bad = ids[(ids >= card.num_classes) & (ids != card.ignore_label)]
    if bad.size:
        raise DatasetError(f"label {sample.label} holds ids {_show(bad)} outside 0..{card.num_classes - 1} "
                           f"(ignore label {card.ignore_label})")
    if label.shape[0] != card.resolution:
        label = _nearest_resize(label, card.resolution)
    return label.astype(np.int64)


def _show(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(v.item()) for v in values[:limit])
    return shown + (f", ... ({values.size} values)" if values.size > limit else "")


def training_label(label: np.ndarray, card: DatasetCard) -> np.ndarray:
    """Spec 5.3: in a training label, a class with 1..19 pixels becomes the ignore label (test GT never).

    Example:
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


# ---- unlabeled images for pretraining ----------------------------------------------------------------

class FolderImages(Sequence[np.ndarray]):
    """Every image under a folder (recursive, sorted), decoded on access as uint8 ``[H, W, 3]``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (32, 32)).save(folder / "x.jpg")
        >>> images = FolderImages(folder, size=16)
        >>> len(images), images[0].shape
        (1, (16, 16, 3))
    """

    def __init__(self, folder: Path, size: int | None = None) -> None:
        self.folder, self.size = Path(folder), size
        self.files = _find_images(self.folder)
        if not self.files:
            raise DatasetError(f"no images (jpg, jpeg, png, gif) in {self.folder}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return read_rgb(self.files[index], self.size)


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


__all__ = [
    "DatasetCard", "Sample", "cards_dir", "list_cards", "get_card", "load_user_card", "dataset_root",
    "download_dataset", "list_samples", "make_split", "derive_seed", "read_rgb", "load_image", "load_label",
    "training_label", "unlabeled_images", "FolderImages", "SMALL_CLASS_MIN_PIXELS",
]
