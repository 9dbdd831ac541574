"""Prediction with a trained ensemble (spec §6): member labels -> majority vote, JS uncertainty, chunking."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from bench.probe_model import EnsembleMLP

def majority_vote(member_labels: Tensor, num_classes: int | None = None) -> Tensor:
    """Per-pixel mode over dim 0 (the members); ties go to the smallest label id (spec §6).

    Example:
        >>> import torch
        >>> votes = torch.tensor([3] * 5 + [7] * 5).view(10, 1)
        >>> majority_vote(votes).tolist()
        [3]
    """
    if num_classes is None:
        num_classes = int(member_labels.max()) + 1 if member_labels.numel() else 1
    counts = torch.zeros((num_classes, *member_labels.shape[1:]), dtype=torch.int32, device=member_labels.device)
    counts.scatter_add_(0, member_labels.long(), torch.ones_like(member_labels, dtype=torch.int32))
    # argmax returns the first maximal index, i.e. the smallest id among tied counts.
    return counts.argmax(dim=0)


def js_uncertainty(member_probs: Tensor) -> Tensor:
    """Per-pixel Jensen-Shannon divergence H(mean p) - mean H(p_m) (natural log) of ``[M, P, K]``.

    Example:
        >>> import torch
        >>> probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two members, sure and disagreeing
        >>> round(js_uncertainty(probs).item(), 4)  # ln 2
        0.6931
    """
    def entropy(p: Tensor) -> Tensor:
        return -torch.special.xlogy(p, p).sum(dim=-1)  # xlogy gives 0 * log 0 = 0

    mean_entropy = entropy(member_probs).mean(dim=0)
    return (entropy(member_probs.mean(dim=0)) - mean_entropy).clamp_min(0.0)  # clamp rounding below 0


def image_uncertainty(js: Tensor) -> float:
    """Image score: mean of the ``floor(P/10)`` largest per-pixel JSD values (at least one value).

    Example:
        >>> import torch
        >>> image_uncertainty(torch.arange(20.0))  # top 2 of 20: 19 and 18
        18.5
    """
    k = max(1, js.numel() // 10)
    return float(js.flatten().topk(k).values.mean())


def predict_chunked(ensemble: EnsembleMLP, feats_fn: Callable[[slice], Tensor], num_pixels: int, *,
                    chunk: int = 65536, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """Label ``num_pixels`` pixels chunk by chunk: majority-vote labels ``[P]`` and JSD ``[P]`` (CPU).

    ``feats_fn(slice)`` returns the ``[n, d]`` features of that pixel range; memory stays bounded
    by ``chunk`` whatever the image size.

    Example:
        >>> import torch
        >>> ens = EnsembleMLP(in_dim=4, num_classes=3, members=3).eval()
        >>> feats = torch.randn(10, 4)
        >>> labels, js = predict_chunked(ens, lambda s: feats[s], 10, chunk=4)
        >>> labels.shape, js.shape
        (torch.Size([10]), torch.Size([10]))
    """
    ensemble = ensemble.to(device)
    labels = torch.empty(num_pixels, dtype=torch.int64)
    js = torch.empty(num_pixels, dtype=torch.float32)
    for start in range(0, num_pixels, chunk):
        part = slice(start, min(start + chunk, num_pixels))
        member_labels, member_probs = ensemble.predict(feats_fn(part).to(device, torch.float32))
        labels[part] = majority_vote(member_labels, ensemble.num_classes).cpu()
        js[part] = js_uncertainty(member_probs).float().cpu()
    return labels, js
