"""Dataset cards, files, ordering, splits, loading, validation and the small-annotation rule."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import data, demo
from bench.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]


# ---- helpers: tiny datasets written by the tests ---------------------------------------------------------

def _image(size: int = 16, value: int = 0, width: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(value)
    return rng.integers(0, 256, (size, width or size, 3), dtype=np.uint8)


def _write_pair(folder: Path, stem: str, label: np.ndarray | None, *, size: int = 16, fmt: str = "npy",
                ext: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(size, len(stem))).save(folder / f"{stem}{ext}")
    if label is None:
        return
    if fmt == "npy":
        np.save(folder / f"{stem}.npy", label)
    else:
        Image.fromarray(label.astype(np.uint8), mode="L").save(folder / f"{stem}_label.png")


def _user_dataset(root: Path, *, fmt: str = "npy", n_train: int = 3, n_test: int = 2, card: dict | None = None,
                  size: int = 16, corner: int = 255) -> Path:
    label = np.zeros((size, size), dtype=np.uint8)
    label[: size // 2] = 1
    label[0, 0] = corner
    for part, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            _write_pair(root / part, f"img_{i}", label, fmt=fmt, size=size)
    (root / "card.json").write_text(json.dumps(card or {"classes": ["bg", "thing", "other"], "ignore_label": 255}))
    return root


def _card(**overrides) -> data.DatasetCard:
    values = dict(name="toy", aliases=(), title="Toy", classes=("a", "b", "c"), ignore_label=255,
                  miou_class_ids=(0, 1, 2), train=3, test=2, resolution=16, domain="", train_dir="train",
                  test_dir="test")
    values.update(overrides)
    return data.DatasetCard(**values)


# ---- cards -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, k, ignore, counted, train, test, domain", [
    ("bedroom_28", 29, 0, list(range(1, 29)), 40, 20, "lsun_bedroom"),
    ("ffhq_34", 34, 255, list(range(34)), 20, 20, "ffhq"),
    ("cat_15", 15, 255, list(range(15)), 30, 20, "lsun_cat"),
    ("horse_21", 21, 255, list(range(21)), 30, 30, "lsun_horse"),
    ("celeba_19", 19, 255, list(range(19)), 20, 500, "ffhq"),
    ("ade_bedroom_30", 30, 255, list(range(30)), 50, 650, "lsun_bedroom"),
])
def test_paper_cards_match_the_spec(name, k, ignore, counted, train, test, domain):
    card = data.get_card(name)
    assert (card.num_classes, card.ignore_label, list(card.miou_class_ids)) == (k, ignore, counted)
    assert (card.train, card.test, card.resolution, card.domain) == (train, test, 256, domain)
    assert card.url == "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/datasets.tar.gz"
    assert card.folder == name
    assert (card.train_dir, card.test_dir, card.label_format) == ("real/train", "real/test", "npy")
    assert card.paper_table == card.title and card.license


def test_class_names_are_the_official_strings():
    assert data.get_card("bedroom_28").classes[2] == "bed***footboard"
    assert data.get_card("bedroom_28").classes[13] == "picture / mirrow"  # the official misspelling
    assert data.get_card("ffhq_34").classes[5] == "head***ear***helix"
    assert data.get_card("ffhq_34").classes[33] == "head***wrinkles"
    assert data.get_card("cat_15").classes[10] == "tongue"
    assert data.get_card("ade_bedroom_30").classes[0] == "wall"


def test_demo_card_matches_the_generator():
    card = data.get_card("demo")
    assert card.classes == demo.CLASS_NAMES and card.generator == "demo" and card.domain == "demo"
    assert (card.resolution, card.train, card.test, card.url) == (64, 20, 20, "")
    assert [c.name for c in data.list_cards()] == sorted(
        ["bedroom_28", "ffhq_34", "cat_15", "horse_21", "celeba_19", "ade_bedroom_30", "demo"])


def test_to_json_is_what_bench_ls_prints():
    out = data.get_card("cat15").to_json()
    assert json.loads(json.dumps(out)) == out
    assert out["name"] == "cat_15" and out["num_classes"] == 15 and out["aliases"] == ["cat15", "cat-15", "cat"]
    assert out["path"] is None and out["miou_class_ids"] == list(range(15))


@pytest.mark.parametrize("alias", ["cat15", "Cat-15", "CAT_15", "cat", " cat 15 "])
def test_aliases_are_case_and_separator_insensitive(alias):
    assert data.get_card(alias).name == "cat_15"


def test_unknown_dataset_suggests_close_names():
    with pytest.raises(DatasetError, match=r"'cat16'.*did you mean .*cat"):
        data.get_card("cat16")
    with pytest.raises(DatasetError, match="known: .*horse_21"):
        data.get_card("zebra")


def test_unknown_card_key_is_named(tmp_path, monkeypatch):
    card = json.loads((REPO / "datasets" / "cat_15.json").read_text())
    (tmp_path / "cat_15.json").write_text(json.dumps({**card, "ignore_lable": 255}))
    monkeypatch.setenv("BENCH_DATASETS_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match=r"cat_15\.json.*'ignore_lable'.*did you mean 'ignore_label'"):
        data.list_cards()


def test_two_cards_claiming_one_alias_are_refused(tmp_path, monkeypatch):
    card = json.loads((REPO / "datasets" / "cat_15.json").read_text())
    (tmp_path / "cat_15.json").write_text(json.dumps(card))
    (tmp_path / "cat_16.json").write_text(json.dumps({**card, "name": "cat_16", "aliases": ["cat"]}))
    monkeypatch.setenv("BENCH_DATASETS_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match="'cat'"):
        data.list_cards()


def test_bad_card_values_are_named(tmp_path, monkeypatch):
    card = json.loads((REPO / "datasets" / "cat_15.json").read_text())
    monkeypatch.setenv("BENCH_DATASETS_DIR", str(tmp_path))
    for key, value in [("miou_class_ids", [0, 15]), ("ignore_label", 300), ("train", 0), ("label_format", "tif")]:
        (tmp_path / "cat_15.json").write_text(json.dumps({**card, key: value}))
        with pytest.raises(DatasetError, match=f"'{key}'.*{value}"):
            data.list_cards()


def test_card_folders_are_not_python_packages():
    # A package named `datasets` would shadow HuggingFace datasets; reports/ is data too.
    assert (REPO / "datasets").is_dir()
    for folder in ("datasets", "reports"):
        assert not (REPO / folder / "__init__.py").exists()


# ---- a user's own dataset folder ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["npy", "png"])
def test_user_folder_dataset_loads(tmp_path, fmt):
    root = _user_dataset(tmp_path / "my_set", fmt=fmt)
    card = data.get_card(str(root))
    assert (card.name, card.path, card.label_format) == ("my_set", root.resolve(), fmt)
    assert (card.train, card.test, card.resolution, card.miou_class_ids) == (3, 2, 16, (0, 1, 2))
    train, test = data.make_split(card, data.dataset_root(card), None)
    assert [s.id for s in train] == ["train/img_0.png", "train/img_1.png", "train/img_2.png"]
    image, label = data.load_image(test[0], card), data.load_label(test[0], card)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert label.dtype == np.int64 and label[0, 0] == 255 and label[1, 0] == 1 and label[15, 15] == 0


def test_user_card_may_override_defaults(tmp_path):
    root = _user_dataset(tmp_path / "custom", card={"classes": ["bg", "x", "y"], "ignore_label": 0, "train": 2,
                                                    "resolution": 32, "name": "mine"}, corner=2)
    card = data.get_card(str(root / "card.json"))
    assert (card.name, card.train, card.test, card.resolution, card.miou_class_ids) == ("mine", 2, 2, 32, (1, 2))
    sample = data.list_samples(card, root, "train")[0]
    assert data.load_image(sample, card).shape == (32, 32, 3) and data.load_label(sample, card).shape == (32, 32)


def test_user_folder_without_card_or_with_unknown_key(tmp_path):
    (tmp_path / "bare").mkdir()
    with pytest.raises(DatasetError, match=r"bare.*card\.json"):
        data.get_card(str(tmp_path / "bare"))
    root = tmp_path / "typo"  # no image folders either: the misspelt key is what the user must see
    root.mkdir()
    (root / "card.json").write_text(json.dumps({"classes": ["a"], "ignore_label": 255, "test_folder": "val"}))
    with pytest.raises(DatasetError, match=r"card\.json: unknown key 'test_folder'"):
        data.get_card(str(root))


# ---- file order and errors ------------------------------------------------------------------------------

def test_first_n_after_a_lexicographic_sort_and_npy_next_to_each_image(tmp_path):
    label = np.zeros((16, 16), dtype=np.uint8)
    for stem in ("img2", "img10", "img1", "b"):
        _write_pair(tmp_path / "train", stem, label)
    _write_pair(tmp_path / "train" / "a", "img", label, ext=".jpg")  # found recursively
    samples = data.list_samples(_card(train=3), tmp_path, "train")
    assert [s.id for s in samples] == ["train/a/img.jpg", "train/b.png", "train/img1.png"]
    assert [s.label.name for s in samples] == ["img.npy", "b.npy", "img1.npy"]
    assert data.list_samples(_card(train=5), tmp_path, "train")[-1].id == "train/img2.png"  # "img10" < "img2"


def test_missing_label_file_is_named(tmp_path):
    _write_pair(tmp_path / "train", "a", np.zeros((16, 16), dtype=np.uint8))
    _write_pair(tmp_path / "train", "b", None)
    with pytest.raises(DatasetError, match=r"label file .*b\.npy .*missing"):
        data.list_samples(_card(train=2), tmp_path, "train")


def test_too_few_and_no_images_are_reported(tmp_path):
    _write_pair(tmp_path / "train", "a", np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"asks for 3 train images but .*train holds only 1"):
        data.list_samples(_card(), tmp_path, "train")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"no images .* test folder .*test"):
        data.list_samples(_card(), tmp_path, "test")
    with pytest.raises(DatasetError, match=r"folder .*nowhere does not exist"):
        data.list_samples(_card(train_dir="nowhere"), tmp_path, "train")


def test_label_errors_name_the_file_and_values(tmp_path):
    card = _card(train=1)
    folder = tmp_path / "train"
    _write_pair(folder, "a", np.zeros((8, 8), dtype=np.uint8))  # image 16x16, label 8x8
    sample = data.list_samples(card, tmp_path, "train")[0]
    with pytest.raises(DatasetError, match=r"a\.npy is 8x8 but its image .*a\.png is 16x16"):
        data.load_label(sample, card)

    label = np.zeros((16, 16), dtype=np.uint8)
    label[3, 3], label[4, 4] = 7, 9  # K = 3, ignore 255
    np.save(folder / "a.npy", label)
    with pytest.raises(DatasetError, match=r"a\.npy holds ids 7, 9 outside 0\.\.2"):
        data.load_label(sample, card)

    np.save(folder / "a.npy", np.full((16, 16), 300, dtype=np.int16))  # the uint8 cast would wrap it
    with pytest.raises(DatasetError, match=r"a\.npy .*300"):
        data.load_label(sample, card)

    np.save(folder / "a.npy", np.array([{"pickled": 1}], dtype=object))  # never unpickled
    with pytest.raises(DatasetError, match=r"cannot read label .*a\.npy"):
        data.load_label(sample, card)


def test_unreadable_images_are_named_and_non_square_ones_fitted(tmp_path):
    card = _card(train=1)
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    np.save(folder / "broken.npy", np.zeros((16, 16), dtype=np.uint8))
    sample = data.list_samples(card, tmp_path, "train")[0]
    with pytest.raises(DatasetError, match=r"cannot read image .*broken\.png"):
        data.load_image(sample, card)
    Image.fromarray(_image(16, width=20)).save(folder / "broken.png")
    # Issue 8 item 21: a non-square photo is fitted to the model's square input, never refused.
    assert data.load_image(sample, card).shape == (card.resolution, card.resolution, 3)
    assert data.load_image(sample, card, fit="crop").shape == (card.resolution, card.resolution, 3)


def test_resizing_to_the_card_resolution(tmp_path):
    label = np.arange(64, dtype=np.uint8).reshape(8, 8) % 3
    _write_pair(tmp_path / "train", "a", label, size=8)
    card = _card(train=1, resolution=16)
    sample = data.list_samples(card, tmp_path, "train")[0]
    assert data.load_image(sample, card).shape == (16, 16, 3)
    # Nearest neighbour like OpenCV INTER_NEAREST: output pixel (y, x) takes input (y // 2, x // 2).
    assert np.array_equal(data.load_label(sample, card), label.repeat(2, 0).repeat(2, 1).astype(np.int64))
    same = _card(train=1, resolution=8)
    assert np.array_equal(data.load_label(sample, same), label)  # unchanged at its own size


# ---- splits and seeds -------------------------------------------------------------------------------------

@pytest.fixture()
def demo_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    card = data.get_card("demo")
    return card, data.dataset_root(card)


def test_released_split_is_the_sorted_first_n(demo_root):
    card, root = demo_root
    train, test = data.make_split(card, root, None)
    assert [s.id for s in train] == [f"real/train/{i:04d}.png" for i in range(20)]
    assert [s.id for s in test] == [f"real/test/{i:04d}.png" for i in range(20)]


def test_resplits_are_reproducible_and_differ_by_seed(demo_root):
    card, root = demo_root
    released = data.make_split(card, root, None)
    pool = {s.id for part in released for s in part}
    splits = {seed: data.make_split(card, root, seed) for seed in range(5)}
    assert data.make_split(card, root, 3) == splits[3]
    assert len({tuple(s.id for s in train) for train, _ in splits.values()}) == 5
    for train, test in splits.values():
        ids = [s.id for s in train], [s.id for s in test]
        assert (len(ids[0]), len(ids[1])) == (card.train, card.test)
        assert set(ids[0]) | set(ids[1]) == pool and not set(ids[0]) & set(ids[1])
        assert ids[0] == sorted(ids[0]) and ids[1] == sorted(ids[1])
    # "bench split v1" is pinned: a change in NumPy's permutation or in derive_seed shows up here.
    assert [s.id for s in splits[0][0][:3]] == GOLDEN_SEED0_TRAIN_HEAD


GOLDEN_SEED0_TRAIN_HEAD = ["real/test/0000.png", "real/test/0004.png", "real/test/0005.png"]


def test_derive_seed_is_a_documented_stable_function():
    import hashlib

    digest = hashlib.sha256(b"bench/split/0/0").digest()
    assert data.derive_seed(0, "split") == int.from_bytes(digest[:8], "big") >> 1
    assert data.derive_seed(0, "member", 1) != data.derive_seed(0, "member", 2) != data.derive_seed(0, "noise")
    assert all(0 <= data.derive_seed(s, "split") < 2**63 for s in range(50))


# ---- the small-annotation rule (spec 5.3, checklist #13) ---------------------------------------------------

def test_training_label_ignores_classes_under_20_pixels_only():
    card = data.get_card("cat_15")
    label = np.zeros((16, 16), dtype=np.int64)
    label.flat[:19] = 3  # class A: 19 pixels -> ignore
    label.flat[19:39] = 4  # class B: 20 pixels -> kept
    train = data.training_label(label, card)
    assert (train == 3).sum() == 0 and (train == 255).sum() == 19 and (train == 4).sum() == 20
    assert (label == 3).sum() == 19  # the input (e.g. test ground truth) is not modified


def test_training_label_with_background_as_ignore():
    card = data.get_card("bedroom_28")  # ignore = 0: the background class itself
    label = np.zeros((16, 16), dtype=np.int64)
    label.flat[:5] = 7
    label.flat[5:30] = 9
    train = data.training_label(label, card)
    assert (train == 7).sum() == 0 and (train == 9).sum() == 25 and (train == 0).sum() == 256 - 25


def test_test_ground_truth_is_never_relabelled(tmp_path):
    label = np.zeros((16, 16), dtype=np.uint8)
    label.flat[:3] = 2  # a 3-pixel class
    _write_pair(tmp_path / "test", "a", label)
    card = _card(test=1)
    assert (data.load_label(data.list_samples(card, tmp_path, "test")[0], card) == 2).sum() == 3


# ---- download and unlabeled images ------------------------------------------------------------------------

def test_download_extracts_the_shared_tarball(tmp_path, monkeypatch):
    home, cards = tmp_path / "home", tmp_path / "cards"
    monkeypatch.setenv("BENCH_HOME", str(home))
    monkeypatch.setenv("BENCH_DATASETS_DIR", str(cards))
    archive = tmp_path / "served" / "datasets.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:  # the tarball nests the sets under datasets/
        for part in ("train", "test"):
            for name, payload in _pair_bytes().items():
                info = tarfile.TarInfo(f"datasets/toy_3/real/{part}/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    cards.mkdir()
    card = {"name": "toy_3", "title": "Toy-3", "classes": ["a", "b", "c"], "ignore_label": 255,
            "miou_class_ids": [0, 1, 2], "train": 1, "test": 1, "resolution": 16, "domain": "toy",
            "url": archive.as_uri(), "folder": "toy_3"}
    (cards / "toy_3.json").write_text(json.dumps(card))

    toy = data.get_card("toy3")
    with pytest.raises(DatasetError, match=r"bench download --dataset toy_3.*looked in"):
        data.dataset_root(toy)
    root = data.download_dataset(toy, progress=False)
    assert root == home / "datasets" / "datasets" / "toy_3"
    assert [s.id for s in data.make_split(toy, root, None)[0]] == ["real/train/0000.png"]
    archive.unlink()  # already there: a second call needs no download
    assert data.download_dataset(toy, progress=False) == root


def _pair_bytes() -> dict[str, bytes]:
    png, npy = io.BytesIO(), io.BytesIO()
    Image.fromarray(_image(16)).save(png, format="PNG")
    np.save(npy, np.ones((16, 16), dtype=np.uint8))
    return {"0000.png": png.getvalue(), "0000.npy": npy.getvalue()}


def test_unlabeled_images_for_pretraining(tmp_path):
    images = data.unlabeled_images("demo")
    assert len(images) >= 10**6 and np.array_equal(images[2], demo.render(2)[0])
    folder = tmp_path / "pool"
    _write_pair(folder, "x", None, size=16)
    _write_pair(folder / "sub", "y", None, size=16)
    pool = data.unlabeled_images(str(folder))
    assert len(pool) == 2 and pool[1].shape == (16, 16, 3)
    with pytest.raises(DatasetError, match=r"cat_15.*folder of images"):
        data.unlabeled_images("cat15")
