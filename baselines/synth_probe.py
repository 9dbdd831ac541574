"""Table 3: the pixel probe trained on synthetic labelled images instead of the real ones.

The paper trains the DDPM method (ddpm features, 10 MLPs) on annotated GENERATED images (DDPM or
GAN samples) and tests it on the real test set. Here the training images are the first n kept
samples of a synthetic set (labelled by its interpreter); everything else is a ``bench run``: the
same backbone and feature cache (keyed by image content), the same ensemble, the same prediction and
metrics on the real test split. Features are taken from the stored uint8 sample, as a human
annotator's image would be.

Example:
    >>> # probe_on_synthetic(synth_set, kept[:20], train_spec, get_card("demo"), test_samples, "cpu")
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.errors import BenchError


def probe_backbone(spec: Any, synth_spec: dict) -> tuple[str, dict]:
    """The probe's backbone: the user's choice, else the set's own (datasetddpm only).

    Example:
        >>> probe_backbone(type("S", (), {"probe_backbone": None, "probe_backbone_kwargs": {}})(),
        ...                {"method": "datasetddpm", "backbone": "ddpm.demo", "backbone_kwargs": {}})
        ('ddpm.demo', {})
    """
    if spec.probe_backbone:
        return spec.probe_backbone, dict(spec.probe_backbone_kwargs)
    if synth_spec.get("method") == "datasetddpm":
        return synth_spec["backbone"], dict(synth_spec.get("backbone_kwargs") or {})
    raise BenchError("the probe on a datasetgan set needs --probe-backbone (the paper uses ddpm features)")


def probe_on_synthetic(synth: Any, kept: np.ndarray, spec: Any, card: Any, test: list, device: str) -> dict:
    """Train the probe on ``kept`` samples' features and score it on the real test split."""
    from bench.labels import training_label
    from bench.runner import RunSpec, extract, fit_probe, plan, predict, score

    name, kwargs = probe_backbone(spec, synth.spec)
    p = plan(RunSpec(backbone=name, dataset=spec.dataset, seed=spec.seed, split=spec.split, backbone_kwargs=kwargs,
                     device=device, max_memory_gb=spec.max_memory_gb, progress=spec.progress, out=Path("unused")))
    backbone = p.backbone
    if backbone.input_size != synth.identity["image_size"]:
        raise BenchError(f"the probe backbone takes {backbone.input_size} px images, the set holds "
                         f"{synth.identity['image_size']} px samples")
    store = extract(p)  # the real split's features (test images), cached as a run's
    samples = [synth.sample(int(i)) for i in kept]
    ids = [hashlib.sha256(image.tobytes()).hexdigest() for image, _ in samples]
    by_id = dict(zip(ids, (image for image, _ in samples)))

    def load(batch_ids: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([by_id[i] for i in batch_ids])).permute(0, 3, 1, 2).contiguous()

    store.ensure(ids, load, backbone.extract, progress=spec.progress, desc="synthetic features")
    labels = [training_label(label.astype(np.int64), card) for _, label in samples]
    trained = fit_probe(store, ids, labels, card, seeds=p.key_parts["member_seeds"], members=p.spec.members,
                        max_memory_gb=spec.max_memory_gb, device=device, progress=spec.progress)
    cm, _ = predict(p, store, trained)
    out = score(p, cm)
    out.update({"num_train_images": len(ids), "num_test_images": len(p.test)})
    return {"score": out, "model": {"members": trained["members"], "backbone_config": p.backbone_config}}
