"""The dataset API in one import: cards, files, splits, images and labels.

Each idea lives in its own module; this one re-exports them so that user code and notebooks can
write ``from bench import data`` and find everything:

- :mod:`bench.cards` what a dataset is (classes, ignore label, sizes, source);
- :mod:`bench.samples` where its files are, its labelled samples, validation, unlabelled images;
- :mod:`bench.splits` released split or a seeded re-split ("bench split v1");
- :mod:`bench.images` image files and the fit rule for non-square photos;
- :mod:`bench.labels` label maps, their checks and the scoring resolution;
- :mod:`bench.seeding` run-seed sub-streams.

Example:
    >>> card = get_card("Cat-15")
    >>> card.name, card.num_classes, card.ignore_label, len(card.miou_class_ids)
    ('cat_15', 15, 255, 15)
"""
from __future__ import annotations

from bench.cards import DatasetCard, cards_dir, get_card, list_cards, load_user_card
from bench.images import FIT_RULES, read_rgb
from bench.labels import SMALL_CLASS_MIN_PIXELS, load_label, training_label
from bench.samples import (FolderImages, Sample, dataset_root, download_dataset, list_samples, load_image,
                           unlabeled_images, validate_samples)
from bench.seeding import derive_seed
from bench.splits import SPLIT_VERSION, make_split

__all__ = [
    "DatasetCard", "Sample", "cards_dir", "list_cards", "get_card", "load_user_card", "dataset_root",
    "download_dataset", "list_samples", "make_split", "derive_seed", "read_rgb", "load_image", "load_label",
    "training_label", "unlabeled_images", "FolderImages", "SMALL_CLASS_MIN_PIXELS", "validate_samples",
    "FIT_RULES", "SPLIT_VERSION",
]
