"""Splits: the released folders, or a re-split of the pooled files from a seed ("bench split v1").

Example:
    >>> from bench.cards import get_card
    >>> from bench.samples import dataset_root
    >>> card = get_card("demo")
    >>> len(make_split(card, dataset_root(card), 0)[0])
    20
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.cards import DatasetCard
from bench.errors import BenchError, DatasetError
from bench.samples import Sample, list_samples
from bench.seeding import derive_seed, is_int

#: the name of the re-split procedure below; part of every run key
SPLIT_VERSION = "bench split v1"


def make_split(card: DatasetCard, root: Path, seed: int | None) -> tuple[list[Sample], list[Sample]]:
    """The train and test samples: the released split (``seed=None``) or re-split ``seed``.

    "bench split v1": pool the released train and test samples; sort their ids in byte order (UTF-8);
    permute with ``numpy.random.Generator(numpy.random.PCG64(derive_seed(seed, "split"))).permutation``;
    train = the first ``card.train``, test = the next ``card.test``; sort each part again by id.

    Example:
        >>> from bench.data import get_card, dataset_root
        >>> card = get_card("demo"); root = dataset_root(card)
        >>> train, test = make_split(card, root, 0)
        >>> len(train), len(test), make_split(card, root, 0)[0] == train
        (20, 20, True)
    """
    train, test = list_samples(card, root, "train"), list_samples(card, root, "test")
    if seed is None:
        return train, test
    if not is_int(seed) or seed < 0:
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


