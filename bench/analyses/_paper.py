"""The paper's numbers for Tables 4, 5 and 7 (spec section 10.4, 10.5, 10.7) and when they may be shown.

These tables report the paper's own method (its diffusion backbone with the official checkpoints).
The core names no backbone, so a row gets the paper's value only when its run is that method under
the paper's conditions: official weights (pretrained, the tag's own file) whose declared Table-2
value for the dataset (``Weights.paper_miou``, the one ``bench report`` shows) is the table's
reference cell, no plugin options beyond the analysis' own, the full official probe (10 members,
no step cap), all training and test images of the split, and the official metric.

Example:
    >>> TABLE4["cat_15"][20]
    (49.2, 4.2)
"""
from __future__ import annotations

from typing import Any

#: Table 4: dataset -> {number of labelled training images: (mean, std)}
TABLE4: dict[str, dict[int, tuple[float, float]]] = {
    "bedroom_28": {40: (49.4, 1.9), 20: (46.2, 3.6), 10: (38.2, 2.9)},
    "cat_15": {30: (53.7, 3.3), 20: (49.2, 4.2), 10: (42.0, 4.8)},
    "horse_21": {30: (65.0, 0.8), 20: (63.8, 0.7), 10: (56.9, 2.4)},
}
#: Table 5: dataset -> {noise variant: (mean, std)}; the default row says 49.3 where Table 2 says 49.4
TABLE5: dict[str, dict[str, tuple[float, float]]] = {
    "bedroom_28": {"shared": (49.3, 1.9), "per_step": (49.1, 2.2), "per_image": (48.9, 1.6)},
    "ffhq_34": {"shared": (59.1, 1.4), "per_step": (59.3, 1.5), "per_image": (59.3, 1.4)},
}
#: Table 7: dataset -> {MLP variant: mean} (the paper gives no std here)
TABLE7: dict[str, dict[str, float]] = {
    "bedroom_28": {"original": 49.4, "wider": 49.5, "deeper": 49.3},
    "ffhq_34": {"original": 59.1, "wider": 59.1, "deeper": 58.9},
}
#: each table's reference cell: the method's Table 2 value for the dataset (identifies the method)
REFERENCE = {"bedroom_28": 49.4, "cat_15": 53.7, "horse_21": 65.0, "ffhq_34": 59.1}


def paper_applies(prep: Any, args: Any, own_options: tuple[str, ...] = ()) -> bool:
    """True when the paper's Table 4/5/7 values may stand beside this prepared run (see the module doc).

    Example:
        >>> # paper_applies(prep, args, own_options=("noise_mode",)) -> False on the demo (no paper value)
    """
    from bench.report import _paper_value
    from bench.registry import split_name

    p = prep.plan
    spec = p.spec
    dataset = p.card.name
    if dataset not in REFERENCE or not spec.pretrained or p.weights_source != "official":
        return False
    if getattr(args, "max_steps", None) is not None or spec.members != 10:
        return False
    if spec.max_train is not None or spec.max_test is not None or getattr(args, "weights", None):
        return False
    if any(k not in ("seed", *own_options) for k in spec.backbone_kwargs):
        return False
    value = _paper_value(split_name(spec.backbone)[0], p.backbone_config.get("tag"), dataset, True, "official",
                         p.backbone_config.get("weights_sha256", ""))
    return value is not None and abs(value[0] - REFERENCE[dataset]) < 1e-9
