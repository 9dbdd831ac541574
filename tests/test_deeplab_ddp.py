"""DeepLab under DistributedDataParallel on a CPU (gloo): 2 ranks, the env-based init torchrun uses."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from baselines.deeplab import build_deeplab
from baselines.deeplab_train import DeepLabConfig, train_deeplab

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


class Tiny(torch.nn.Module):
    """No BatchNorm, no dropout: DDP on 2 ranks must then be the single-process step on the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict:
        return {"out": self.conv(x)}


class Pairs:
    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        self.labels = rng.integers(0, 3, (n, size, size)).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, work: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from baselines import deeplab_ddp, deeplab_train

    writes: list[str] = []
    save = deeplab_train._save_atomic
    deeplab_train._save_atomic = lambda obj, path: (writes.append(Path(path).name), save(obj, path))[1]
    assert deeplab_ddp.init_from_env("cpu")[:2] == (rank, world)
    work = Path(work)
    tiny = Tiny()
    tiny.load_state_dict(torch.load(work / "tiny_init.pth", weights_only=True))
    train_deeplab(tiny, Pairs(8, 8), work / "tiny", DeepLabConfig(arch="small", epochs=2, batch_size=4, nproc=2),
                  progress=False)
    small = build_deeplab(3, "small")
    small.load_state_dict(torch.load(work / "small_init.pth", weights_only=True))
    train_deeplab(small, Pairs(4, 32, seed=1), work / "small", DeepLabConfig(arch="small", epochs=1, batch_size=4,
                                                                              nproc=2), progress=False)
    torch.save({"tiny": tiny.state_dict(), "small": {k: v for k, v in small.named_parameters()}},
               work / f"rank{rank}.pth")
    (work / f"rank{rank}_writes.json").write_text(json.dumps(writes))
    dist.destroy_process_group()


def test_two_ranks_agree_equal_one_process_on_the_whole_batch_and_only_rank0_writes(tmp_path):
    torch.manual_seed(0)
    tiny, small = Tiny(), build_deeplab(3, "small")
    torch.save(tiny.state_dict(), tmp_path / "tiny_init.pth")
    torch.save(small.state_dict(), tmp_path / "small_init.pth")
    mp.start_processes(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    for part in ("tiny", "small"):  # DDP keeps the replicas' parameters identical, bit for bit
        assert r0[part].keys() == r1[part].keys()
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part])
    init = torch.load(tmp_path / "small_init.pth", weights_only=True)
    assert any(not torch.equal(r0["small"][k], init[k]) for k in r0["small"])  # it trained

    # the same 2 epochs in one process, batch 4: same batches, gradients averaged = the batch's mean loss
    single = Tiny()
    single.load_state_dict(torch.load(tmp_path / "tiny_init.pth", weights_only=True))
    train_deeplab(single, Pairs(8, 8), tmp_path / "single", DeepLabConfig(arch="small", epochs=2, batch_size=4),
                  progress=False)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["tiny"][k], v, rtol=1e-5, atol=1e-6)
    moved = max(float((v - torch.load(tmp_path / "tiny_init.pth", weights_only=True)[k]).abs().max())
                for k, v in single.state_dict().items())
    assert moved > 1e-3  # a real comparison: the weights went somewhere

    assert json.loads((tmp_path / "rank0_writes.json").read_text()) == [
        "deeplab_epoch_0.pth", "deeplab_epoch_1.pth", "deeplab_epoch_0.pth"]
    assert json.loads((tmp_path / "rank1_writes.json").read_text()) == []
    ckpt = torch.load(tmp_path / "tiny" / "deeplab_epoch_1.pth", weights_only=True)
    assert set(ckpt["model_state_dict"]) == {"conv.weight", "conv.bias"}  # saved without DDP's "module." prefix
    assert len(ckpt["rng_state"]["ranks"]) == 2


def test_nproc_2_trains_under_torchrun(tmp_path):
    model = build_deeplab(3, "small")
    config = DeepLabConfig(arch="small", epochs=1, batch_size=4, nproc=2)
    paths = train_deeplab(model, Pairs(4, 32), tmp_path / "work", config, progress=False)
    assert [p.name for p in paths] == ["deeplab_epoch_0.pth"] and paths[0].exists()
    state = torch.load(paths[0], weights_only=True)
    assert state["epoch"] == 0 and len(state["rng_state"]["ranks"]) == 2
    init = torch.load(tmp_path / "work" / "ddp" / "init.pth", weights_only=True)
    assert init.keys() == state["model_state_dict"].keys()
    assert any(not torch.equal(init[k], state["model_state_dict"][k]) for k in init)
    assert not list((tmp_path / "work").glob(".*tmp"))
    assert DeepLabConfig(nproc=2).to_dict()["nproc"] == 2 and "nproc" not in DeepLabConfig().to_dict()


def test_nproc_must_divide_the_batch():
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="divide the batch 8"):
        DeepLabConfig(nproc=3)
    with pytest.raises(BenchError, match="BatchNorm needs at least 2"):
        DeepLabConfig(batch_size=8, nproc=8)


def test_a_synthetic_training_set_reaches_the_ranks_as_files(tmp_path):
    from baselines.deeplab_ddp import _describe_train_set, _open_train_set
    from baselines.released import import_released
    from baselines.synth_train import KeptSamples

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rel.npz", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
             rng.integers(0, 9, (6, 8, 8), dtype=np.uint8), rng.random(6).astype(np.float32))
    synth = import_released(tmp_path / "rel.npz", "datasetddpm", "demo", shard_size=4, root=tmp_path / "s",
                            progress=False)
    kept = KeptSamples(synth, np.array([5, 0, 3]))
    desc = json.loads(json.dumps(_describe_train_set(kept, tmp_path)))  # what job.json carries
    assert desc["kind"] == "synth" and not (tmp_path / "train_set.npz").exists()
    opened = _open_train_set(desc)
    assert len(opened) == 3
    for i in range(3):
        assert all(np.array_equal(a, b) for a, b in zip(opened[i], kept[i]))
