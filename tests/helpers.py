"""Small helpers shared by several test files (imported as ``from helpers import ...``)."""
from __future__ import annotations

from pathlib import Path


class WritesMarker:
    """A malicious pickle payload: unpickling this object runs ``exec``, which creates a marker file.

    Tests put it inside each official checkpoint container and check that our loaders refuse the file
    and that the marker does not exist afterwards (so nothing from the file ran).
    """

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def blobs(n: int, dim: int = 16, classes: int = 3, seed: int = 0,
          sample_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around zero-mean centres (drawn from ``seed``; points from ``sample_seed``).

    Separable, and no hidden unit has the same sign over a whole batch: that would make a pre-BN
    bias gradient pure rounding noise, which Adam turns into full-size random steps.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    if sample_seed is not None:
        g.manual_seed(sample_seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def count_images_through(monkeypatch, backbone_class) -> list[int]:
    """Patch ``backbone_class.forward_features`` to record each batch's size; returns the (live) list.

    An empty list after a call means nothing went through the model: the features came from the cache.
    """
    seen: list[int] = []
    original = backbone_class.forward_features

    def counting(self, x):
        seen.append(int(x.shape[0]))
        return original(self, x)

    monkeypatch.setattr(backbone_class, "forward_features", counting)
    return seen
