"""DeepLabV3 training under torchrun / DistributedDataParallel (nccl on CUDA, gloo on a CPU).

Two ways in, one training loop (:func:`baselines.deeplab_train.train_deeplab`):

- ``bench synth ... --nproc N`` (``DeepLabConfig(nproc=N)``): the command makes the set and plans the
  result in one process; only the DeepLab training runs under ``torchrun --standalone --nproc_per_node N``
  (:func:`launch` writes the job: the initial weights, the training set's description), and the command
  goes on with selection and scoring once the ranks have written the epoch checkpoints.
- ``torchrun --nproc_per_node N -m baselines.deeplab_ddp JOB.json`` by hand (a job :func:`launch` wrote,
  e.g. to run it on other machines with ``--nnodes``): every rank reads ``RANK``/``WORLD_SIZE``/
  ``LOCAL_RANK`` and the rendezvous from the environment (:func:`init_from_env`).

Example:
    >>> rank_and_world()
    (0, 1)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.errors import BenchError


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "cpu") -> tuple[int, int, str]:
    """Join the process group torchrun describes in the environment; returns ``(rank, world, device)``.

    nccl on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on a CPU.

    Example:
        >>> # under torchrun: rank, world, device = init_from_env("cuda")
    """
    import torch
    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise BenchError(f"not under torchrun: {', '.join(missing)} not set in the environment")
    local = int(os.environ["LOCAL_RANK"])
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size(), device


def _comm_device() -> Any:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap(model: Any, device: str) -> Any:
    """DDP around ``model`` (already on ``device``); on CUDA its BatchNorms become SyncBatchNorm."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if str(device).startswith("cuda"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[torch.device(device).index])
    return DistributedDataParallel(model)


def gather_rng_states(device: str) -> list:
    """Every rank's ``(cpu RNG state, cuda RNG state or empty)``, in rank order (for the checkpoint)."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.get_rng_state(device) if str(device).startswith("cuda") else torch.zeros(0, dtype=torch.uint8)
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, (torch.get_rng_state(), cuda))
    return [(a.cpu(), b.cpu()) for a, b in states]


def check_same_on_all_ranks(value: int, what: str) -> None:
    """One-line error on every rank if the ranks disagree on ``value``."""
    import torch
    import torch.distributed as dist

    low = torch.tensor([value], device=_comm_device())
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if int(low) != int(high):
        raise BenchError(f"the ranks disagree on the {what}: {int(low)} vs {int(high)}")


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


# ----- a job for torchrun -------------------------------------------------------------------------

def _describe_train_set(train_set: Any, folder: Path) -> dict:
    """The training set as files a rank can open: a synthetic set's folder and kept indices, else an .npz."""
    synth, kept = getattr(train_set, "synth", None), getattr(train_set, "kept", None)
    if synth is not None and kept is not None:
        np.save(folder / "kept.npy", np.asarray(kept, dtype=np.int64))
        fields = {k: v for k, v in asdict(synth).items() if k != "spec"}
        return {"kind": "synth", "set": json.loads(json.dumps(fields, default=str)), "kept": str(folder / "kept.npy")}
    pairs = [train_set[i] for i in range(len(train_set))]
    np.savez(folder / "train_set.npz", images=np.stack([p[0] for p in pairs]),
             labels=np.stack([np.asarray(p[1]) for p in pairs]))
    return {"kind": "arrays", "file": str(folder / "train_set.npz")}


def launch(model: Any, train_set: Any, out_dir: Path, config: Any, *, device: str = "cpu",
           progress: bool = True) -> list[Path]:
    """Train under ``torchrun --standalone --nproc_per_node config.nproc`` and wait; returns the checkpoints.

    Example:
        >>> # launch(build_deeplab(9, "small"), kept, Path("work"), DeepLabConfig(arch="small", nproc=2))
    """
    import torch

    from baselines.deeplab_train import checkpoint_path

    folder = Path(out_dir) / "ddp"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / "init.pth")
    job = {"config": asdict(config), "out_dir": str(out_dir), "device": str(device), "progress": progress,
           "init": str(folder / "init.pth"), "train_set": _describe_train_set(train_set, folder)}
    (folder / "job.json").write_text(json.dumps(job, indent=1))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.nproc}",
               "-m", "baselines.deeplab_ddp", str(folder / "job.json")]
    code = subprocess.call(command)
    if code != 0:
        raise BenchError(f"DeepLab training under torchrun failed (exit status {code}; its output is above); "
                         f"the job is {folder / 'job.json'} and finished epochs resume")
    return [checkpoint_path(Path(out_dir), e) for e in range(config.epochs)]


class _Kept:
    def __init__(self, synth: Any, kept: np.ndarray) -> None:
        self.synth, self.kept = synth, kept

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.synth.sample(int(self.kept[i]))


class _Arrays:
    def __init__(self, path: str) -> None:
        with np.load(path, allow_pickle=False) as data:
            self.images, self.labels = data["images"], data["labels"]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[i], self.labels[i]


def _open_train_set(desc: dict) -> Any:
    if desc["kind"] == "synth":
        from baselines.synth import SynthSet

        fields = dict(desc["set"], root=Path(desc["set"]["root"]))
        return _Kept(SynthSet(**fields), np.load(desc["kept"], allow_pickle=False))
    return _Arrays(desc["file"])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of one rank: ``torchrun --nproc_per_node N -m baselines.deeplab_ddp JOB.json``."""
    import torch
    import torch.distributed as dist

    from baselines.deeplab import build_deeplab
    from baselines.deeplab_train import DeepLabConfig, train_deeplab

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: torchrun --nproc_per_node N -m baselines.deeplab_ddp JOB.json", file=sys.stderr)
        return 2
    try:
        job = json.loads(Path(args[0]).read_text())
        config = DeepLabConfig(**job["config"])
        rank, world, device = init_from_env(job["device"])
        if str(device) == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        state = torch.load(job["init"], map_location="cpu", weights_only=True)
        head = [k for k in state if k.startswith("classifier.") and k.endswith(".weight")][-1]
        model = build_deeplab(int(state[head].shape[0]), config.arch)
        model.load_state_dict(state)
        train_deeplab(model, _open_train_set(job["train_set"]), Path(job["out_dir"]), config, device=device,
                      progress=bool(job.get("progress", True)))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
