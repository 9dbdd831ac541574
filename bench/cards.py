"""Dataset cards: what a dataset is (classes, ignore label, counted classes, sizes, source, licence).

A *card* (``datasets/<name>.json``, shipped inside the package, or ``card.json`` in a user's folder)
says what a dataset is: class names in id order, the ignore label, which ids the official mIoU
counts, train/test sizes, resolution, domain (which picks checkpoint tags), where to download it.
This module reads and validates cards only; it imports neither numpy nor torch, so listing the
datasets is instant and works from a bare wheel install.

Example:
    >>> card = get_card("Cat-15")
    >>> card.name, card.num_classes, card.ignore_label, len(card.miou_class_ids)
    ('cat_15', 15, 255, 15)
"""
from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from bench.errors import DatasetError, UnknownDatasetError
from bench.seeding import is_int as _is_int

USER_CARD_FILE = "card.json"
#: label maps are cast to uint8 like the official loader: ids 0..255, the ignore label included
MAX_LABEL_ID = 255



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
    if not _is_int(ignore) or not 0 <= ignore <= MAX_LABEL_ID:
        raise bad("ignore_label", f"must be an integer in 0..{MAX_LABEL_ID}")
    ids_needed = k if ignore < k else k + 1  # the ignore id needs a value of its own unless it is a class
    if ids_needed > MAX_LABEL_ID + 1:
        raise DatasetError(f"dataset card {source}: {k} classes plus ignore label {ignore} do not fit uint8 label "
                           f"maps (ids 0..{MAX_LABEL_ID}, as the official loader reads them); at most "
                           f"{MAX_LABEL_ID + 1 if ignore < k else MAX_LABEL_ID} classes")
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
    """The folder of the built-in cards (or ``$BENCH_DATASETS_DIR``).

    An installed wheel carries them as package data in ``bench/_cards`` (pyproject maps the
    repository's ``datasets/`` there, so no package named ``datasets`` is ever installed); a source
    checkout or an editable install reads the repository's ``datasets/`` directly.

    Example:
        >>> (cards_dir() / "cat_15.json").is_file()
        True
    """
    override = os.environ.get("BENCH_DATASETS_DIR", "").strip()
    if override:
        return Path(override).expanduser()
    package = Path(__file__).resolve().parent
    shipped = package / "_cards"
    if shipped.is_dir():
        return shipped
    return package.parent / "datasets"


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
        raise UnknownDatasetError(f"dataset folder {path} does not exist")
    known = sorted({n for c in cards for n in (c.name, *c.aliases)})
    close = difflib.get_close_matches(text.lower(), known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownDatasetError(f"unknown dataset {text!r}{hint} (known: {', '.join(c.name for c in cards)}; "
                       f"or give a folder with a {USER_CARD_FILE})")


def load_user_card(folder_or_file: Path) -> DatasetCard:
    """The card of a user's dataset folder; only ``classes`` and ``ignore_label`` are required.

    Defaults: name = folder name, train/test dirs ``train``/``test``, train/test = number of images
    found there, resolution = the first training image's size, miou_class_ids = every id except the
    ignore label, label_format = ``npy`` if any ``.npy`` file is in the train folder, else ``png``
    (``<stem>_label.png`` next to each image).

    Example:
        >>> import tempfile, numpy as np
        >>> from PIL import Image
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
    from bench.images import find_images, image_size

    found = {part: find_images(folder) if folder.is_dir() else [] for part, folder in dirs.items()}
    for part in ("train", "test"):
        if part not in data:
            if not found[part]:
                raise DatasetError(f"dataset {root}: no images (jpg, jpeg, png, gif) in {dirs[part]}")
            data[part] = len(found[part])
    if "resolution" not in data:
        first = found["train"][0] if found["train"] else None
        if first is None:
            raise DatasetError(f"dataset {root}: no images in {dirs['train']} to take the resolution from")
        width, height = image_size(first)
        # A non-square photo is fitted to a square model input (bench.images): its shorter side.
        data["resolution"] = min(width, height)
    return _card_from_mapping(data, str(file), path=root)

