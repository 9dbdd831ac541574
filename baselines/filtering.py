"""Which synthetic samples train the segmenter: drop the most uncertain (baselines spec §3.4, D3).

Both synthetic-data baselines score each generated image by the ensemble's JS uncertainty (the mean
of its ``floor(P/10)`` largest per-pixel values) and drop the most uncertain part of the set.

- ``paper`` (default): "remove the 10% most uncertain": truncate to the first ``max_data`` samples in
  file order, sort by score (stable, so ties keep sample order), keep the ``N - floor(portion * N)``
  lowest.
- ``official_offset30``: the index rule of the official DeepLab scripts (DatasetGAN's and
  ddpm-segmentation's): sorted positions ``30 .. N - n + 29``. It drops the 30 MOST CERTAIN samples
  and only ``n - 30`` uncertain ones; for ``n <= 30`` the official slice is empty and training
  silently gets no data, so we raise instead.

Example:
    >>> import numpy as np
    >>> keep_indices(np.array([0.3, 0.1, 0.9, 0.2, 0.5, 0.4, 0.6, 0.7, 0.8, 0.0]), portion=0.1).tolist()
    [0, 1, 3, 4, 5, 6, 7, 8, 9]
"""
from __future__ import annotations

import numpy as np

from bench.errors import BenchError

RULES = ("paper", "official_offset30")
OFFICIAL_OFFSET = 30


def keep_indices(scores: np.ndarray, *, portion: float = 0.1, rule: str = "paper",
                 max_data: int | None = None) -> np.ndarray:
    """Sample indices (ascending) that survive the filter, from the per-sample scores in file order.

    Example:
        >>> import numpy as np
        >>> len(keep_indices(np.arange(1000.0))), int(keep_indices(np.arange(1000.0)).max())
        (900, 899)
        >>> kept = keep_indices(np.arange(1000.0), rule="official_offset30")
        >>> int(kept.min()), int(kept.max()), len(kept)
        (30, 929, 900)
    """
    if rule not in RULES:
        raise BenchError(f"unknown filter rule {rule!r}; use one of {', '.join(RULES)}")
    if not 0.0 <= float(portion) < 1.0:
        raise BenchError(f"filter portion must be in [0, 1), got {portion!r}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise BenchError(f"scores must be one value per sample, got shape {list(scores.shape)}")
    if max_data is not None:
        if max_data < 1:
            raise BenchError(f"max_data must be positive, got {max_data}")
        if max_data > len(scores):
            raise BenchError(f"max_data {max_data} is more than the {len(scores)} samples the set holds")
        scores = scores[:max_data]
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise BenchError(f"sample {bad} has a non-finite uncertainty score ({scores[bad]})")
    count = len(scores)
    dropped = int(np.floor(float(portion) * count))
    order = np.argsort(scores, kind="stable")  # stable: equal scores keep file order
    if rule == "paper":
        kept = order[: count - dropped]
    else:
        if dropped <= OFFICIAL_OFFSET:
            raise BenchError(f"the official_offset30 rule keeps sorted positions 30..{count - dropped + 29} of "
                             f"{count} samples, an empty slice (it needs floor({portion} * N) > 30); use the paper rule")
        kept = order[OFFICIAL_OFFSET: count - dropped + OFFICIAL_OFFSET]
    if len(kept) == 0:
        raise BenchError(f"the filter keeps no sample of {count}")
    return np.sort(kept)
