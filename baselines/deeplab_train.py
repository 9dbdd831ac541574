"""DeepLabV3 training on a synthetic set, epoch selection on real images, evaluation (baselines spec §4).

Recipe (the official one): Adam lr 1e-3 (default betas, no weight decay, no schedule), batch 8 from a
per-epoch shuffle with the incomplete batch dropped, 20 epochs, cross-entropy over every pixel (no
ignore index: synthetic labels are all classes), train mode (BatchNorm batch statistics), fp32,
seed 0. After each epoch ``deeplab_epoch_<e>.pth`` is written atomically with the model, the
optimizer and the shuffle generator's state (all plain tensors: ``torch.load(weights_only=True)``),
so a killed training resumes after its last finished epoch and ends bit-identical.

Selection: each epoch's checkpoint is scored (official mIoU) on the real labelled training images,
which DeepLab never saw; the strictly best one is reported on the real test images. Ties go to the
lowest epoch; ``lexicographic`` visits checkpoints in the official string order (0, 1, 10..19, 2..9)
and keeps the first visited; if every validation mIoU is 0 there is no test value (an error).

On CUDA, ``amp`` trains under autocast with a gradient scaler and ``workers`` loads batches in
DataLoader worker processes; both are recorded and are not the paper's recipe.

Distributed (``nproc`` > 1, or a process group already set up by ``torchrun``; see
:mod:`baselines.deeplab_ddp`): every rank draws the same per-epoch shuffle and takes its own slice of
each global batch of ``batch_size``, so a step sees exactly the single-process batch; DDP averages
the gradients, which for equal slices is the gradient of the batch's mean loss. What differs: BatchNorm
statistics are per rank on a CPU (SyncBatchNorm, the global batch's, on CUDA) and each rank draws its
own dropout masks, so ``nproc`` is part of the recipe (recorded; absent from the record when 1). Rank 0
alone writes checkpoints; the ranks meet at a barrier before anyone reads them.

Example:
    >>> select_epoch({2: 0.5, 10: 0.5}), select_epoch({2: 0.5, 10: 0.5}, "lexicographic")
    (2, 10)
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from baselines.deeplab import ARCHS, preprocess
from bench.errors import BenchError


@dataclass(frozen=True)
class DeepLabConfig:
    """The DeepLab recipe; the defaults are the official ones.

    Example:
        >>> DeepLabConfig().to_dict()["epochs"]
        20
    """

    arch: str = "resnet101"
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    backbone_init: str = "imagenet"  # imagenet | random (flagged: not comparable)
    amp: bool = False  # CUDA only
    workers: int = 0  # CUDA only
    selection: str = "lowest_epoch"  # lowest_epoch | lexicographic
    nproc: int = 1  # data-parallel processes (DDP); batch_size is the global batch

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise BenchError(f"unknown DeepLab arch {self.arch!r}; use one of {', '.join(ARCHS)}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise BenchError(f"DeepLab {name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise BenchError(f"DeepLab lr must be positive, got {self.lr}")
        if self.backbone_init not in ("imagenet", "random"):
            raise BenchError(f"DeepLab backbone init must be imagenet or random, got {self.backbone_init!r}")
        if self.selection not in ("lowest_epoch", "lexicographic"):
            raise BenchError(f"DeepLab selection must be lowest_epoch or lexicographic, got {self.selection!r}")
        if self.workers < 0:
            raise BenchError(f"DeepLab workers must be >= 0, got {self.workers}")
        if int(self.nproc) < 1 or self.batch_size % int(self.nproc):
            raise BenchError(f"DeepLab nproc must be >= 1 and divide the batch {self.batch_size}, got {self.nproc}")
        if self.nproc > 1 and self.batch_size // self.nproc < 2:  # train-mode BatchNorm needs 2 images per rank
            raise BenchError(f"DeepLab nproc {self.nproc} leaves {self.batch_size // self.nproc} image per rank of "
                             f"the batch {self.batch_size}; BatchNorm needs at least 2")

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["nproc"] == 1:  # single-process records (and run keys) stay what they were
            del data["nproc"]
        return data


def checkpoint_path(out_dir: Path, epoch: int) -> Path:
    """``out_dir/deeplab_epoch_<e>.pth``, the official name."""
    return Path(out_dir) / f"deeplab_epoch_{epoch}.pth"


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _batch(train_set: Any, idx: Sequence[int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [train_set[int(i)] for i in idx]
    images = preprocess(np.stack([p[0] for p in pairs]), device)
    labels = torch.from_numpy(np.stack([np.asarray(p[1], dtype=np.int64) for p in pairs])).to(device)
    return images, labels


class _Batches(torch.utils.data.Dataset):
    """Batches as dataset items, so DataLoader workers (CUDA) assemble whole batches in parallel."""

    def __init__(self, train_set: Any, batches: list[list[int]]) -> None:
        self.train_set, self.batches = train_set, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _batch(self.train_set, self.batches[i], "cpu")


def _epochs(model: torch.nn.Module, optimizer: Any, scaler: Any, generator: torch.Generator, train_set: Any,
            out_dir: Path, config: DeepLabConfig, first: int, steps: int, device: str, progress: bool,
            rank: int = 0, world: int = 1) -> None:
    """Epochs ``first..epochs-1``, a checkpoint after each (rank ``rank`` of ``world`` takes its slice of each batch)."""
    from bench.progress import progress as progress_bar

    cuda = str(device).startswith("cuda")
    with progress_bar(total=(config.epochs - first) * steps, desc="deeplab", unit="step",
                      enabled=progress and rank == 0) as bar:
        for epoch in range(first, config.epochs):
            model.train()
            order = torch.randperm(len(train_set), generator=generator)[: steps * config.batch_size]
            batches = [order[k * config.batch_size:(k + 1) * config.batch_size][rank::world].tolist()
                       for k in range(steps)]
            if config.workers > 0 and cuda:
                loader: Any = torch.utils.data.DataLoader(_Batches(train_set, batches), batch_size=None,
                                                          num_workers=config.workers, pin_memory=True)
            else:
                loader = (_batch(train_set, b, "cpu") for b in batches)
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", enabled=scaler is not None):
                    loss = F.cross_entropy(model(images)["out"].float(), labels)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                bar.update(1)
            rng = {"cpu": torch.get_rng_state()}
            if cuda:
                rng["cuda"] = torch.cuda.get_rng_state(device)
            if world > 1:  # each rank's dropout stream, so that a resumed training draws the same masks
                from baselines.deeplab_ddp import gather_rng_states

                rng["ranks"] = gather_rng_states(device)
            if rank == 0:
                _save_atomic({"model_state_dict": (model.module if world > 1 else model).state_dict(),
                              "optimizer_state_dict": optimizer.state_dict(), "generator_state": generator.get_state(),
                              "rng_state": rng, "epoch": epoch}, checkpoint_path(out_dir, epoch))


def train_deeplab(model: torch.nn.Module, train_set: Any, out_dir: Path, config: DeepLabConfig, *,
                  device: str = "cpu", progress: bool = True) -> list[Path]:
    """Train ``config.epochs`` epochs (resuming after the last finished one); returns the epoch checkpoints.

    Example:
        >>> # train_deeplab(build_deeplab(9, "small"), kept_samples, Path("runs/dl"), DeepLabConfig(arch="small"))
    """
    from baselines import deeplab_ddp

    out_dir = Path(out_dir)
    rank, world = deeplab_ddp.rank_and_world()
    if config.nproc > 1 and world == 1:  # not under torchrun yet: run this training under it
        return deeplab_ddp.launch(model, train_set, out_dir, config, device=device, progress=progress)
    if world != config.nproc:
        raise BenchError(f"DeepLab nproc is {config.nproc} but the process group has {world} processes")
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for stale in out_dir.glob(".deeplab_epoch_*.tmp"):
            stale.unlink(missing_ok=True)
    steps = len(train_set) // config.batch_size
    if steps == 0:
        raise BenchError(f"{len(train_set)} training samples make no full batch of {config.batch_size}")
    cuda = str(device).startswith("cuda")
    model = model.to(device)
    if world > 1:
        model = deeplab_ddp.wrap(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler("cuda") if (config.amp and cuda) else None
    generator = torch.Generator().manual_seed(config.seed)
    done = [e for e in range(config.epochs) if checkpoint_path(out_dir, e).exists()]
    first, rng_state = 0, None
    if world > 1:
        deeplab_ddp.check_same_on_all_ranks(len(done), f"epoch checkpoints found in {out_dir} (a folder not shared?)")
    if done:
        last = max(e for e in done if all(checkpoint_path(out_dir, k).exists() for k in range(e + 1)))
        state = torch.load(checkpoint_path(out_dir, last), map_location="cpu", weights_only=True)
        (model.module if world > 1 else model).load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer_state_dict"])
        generator.set_state(state["generator_state"])
        rng_state = state["rng_state"]
        first = last + 1
    # Dropout (the ASPP projection's) draws from the global RNG: seed it here and checkpoint it, so a
    # resumed training draws the same masks; fork_rng leaves the caller's RNG untouched.
    devices = [torch.device(device).index or 0] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed + rank)  # rank 0 (and a single process) keeps the recipe's seed
        if rng_state is not None:
            if world > 1:
                cpu_state, cuda_state = rng_state["ranks"][rank]
                rng_state = {"cpu": cpu_state, **({"cuda": cuda_state} if cuda else {})}
            torch.set_rng_state(rng_state["cpu"])
            if cuda and "cuda" in rng_state:
                torch.cuda.set_rng_state(rng_state["cuda"], device)
        _epochs(model, optimizer, scaler, generator, train_set, out_dir, config, first, steps, device, progress,
                rank, world)
    if world > 1:
        deeplab_ddp.barrier()  # rank 0's last checkpoint is on disk before any rank goes on to read it
    return [checkpoint_path(out_dir, e) for e in range(config.epochs)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: Sequence[tuple[np.ndarray, np.ndarray]], *, num_classes: int,
             ignore_label: int, device: str = "cpu") -> Any:
    """Confusion matrix of the argmax prediction over real ``(image uint8 [H, W, 3], gt [H, W])`` pairs.

    Example:
        >>> from baselines.deeplab import build_deeplab
        >>> m = build_deeplab(3, "small")
        >>> cm = evaluate(m, [(np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.int64))], num_classes=3, ignore_label=255)
        >>> int(cm.counts.sum())
        4096
    """
    from bench.metrics import ConfusionMatrix

    model = model.to(device).eval()
    cm = ConfusionMatrix(num_classes, ignore_label)
    for image, gt in samples:  # one image at a time, as the official evaluation
        pred = model(preprocess(image[None], device))["out"].argmax(1)[0].cpu().numpy()
        cm.update(pred, np.asarray(gt))
    return cm


def select_epoch(val_miou: Mapping[int, float], order: str = "lowest_epoch") -> int:
    """The strictly best epoch; ties: lowest epoch, or the first in the official lexicographic order.

    Example:
        >>> select_epoch({0: 0.0, 1: 0.0})
        Traceback (most recent call last):
        bench.errors.BenchError: every validation mIoU is 0: no checkpoint to report a test value for
    """
    if not val_miou:
        raise BenchError("no DeepLab checkpoint to select from")
    if all(v == 0 for v in val_miou.values()):
        raise BenchError("every validation mIoU is 0: no checkpoint to report a test value for")
    if order == "lexicographic":
        visit = sorted(val_miou, key=lambda e: f"deeplab_epoch_{e}.pth")
    elif order == "lowest_epoch":
        visit = sorted(val_miou)
    else:
        raise BenchError(f"unknown selection order {order!r}")
    best = visit[0]
    for epoch in visit[1:]:
        if val_miou[epoch] > val_miou[best]:  # strictly better: ties keep the first visited
            best = epoch
    return best


def select_and_evaluate(model_factory: Callable[[], torch.nn.Module], checkpoints: Sequence[Path],
                        val_samples: Sequence, test_samples: Sequence, *, num_classes: int, ignore_label: int,
                        class_ids: Sequence[int], order: str = "lowest_epoch", device: str = "cpu") -> dict:
    """Score every epoch on the validation images, pick one, report its test mIoU (both variants)."""
    model = model_factory()
    val = {}
    for epoch, path in enumerate(checkpoints):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"])
        cm = evaluate(model, val_samples, num_classes=num_classes, ignore_label=ignore_label, device=device)
        val[epoch] = float(cm.miou("official", class_ids))
    best = select_epoch(val, order)
    model.load_state_dict(torch.load(checkpoints[best], map_location="cpu", weights_only=True)["model_state_dict"])
    cm = evaluate(model, test_samples, num_classes=num_classes, ignore_label=ignore_label, device=device)
    standard = [None if np.isnan(v) else float(v) for v in cm.iou("standard", class_ids)]
    return {"val_miou": val, "best_epoch": best,
            "test": {"official": float(cm.miou("official", class_ids)), "standard": float(cm.miou("standard", class_ids)),
                     "per_class_official": [float(v) for v in cm.iou("official", class_ids)],
                     "per_class_standard": standard}}
