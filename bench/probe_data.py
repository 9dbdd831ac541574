"""Where the probe's training pixels come from: the :class:`PixelSource` protocol and the batch loaders.

A loader hands the step loop one ``[members, batch, d]`` batch per step, each member's rows from its
own permutation; :class:`_InlineLoader` gathers when asked, :class:`_Prefetcher` loads the next step's
batch in a background thread (pinned memory and non-blocking copies on CUDA). Both deliver the features
in the dtype the step computes in (float32, or the low precision of :mod:`bench.probe_precision`).
"""
from __future__ import annotations

import os
from typing import Protocol

import torch
from torch import Tensor

from bench.errors import BenchError


class PixelSource(Protocol):
    """Training pixels as the feature store provides them (labels already filtered of ignore).

    ``gather(index int64 [n]) -> float32 [n, dim]``; ``labels`` is int64 ``[num_pixels]``. Anything
    with these members works; the probe asks for ``members * batch_size`` pixels per step. An optional
    ``gather_is_costly = True`` (e.g. sampling from disk) makes the probe load the next step's pixels
    in a background thread with a core of its own; otherwise each step gathers its own, inline. An
    optional ``gather_as(index, dtype) -> [n, dim]`` lets a low-precision probe read the rows in its
    own dtype without a float32 copy (:func:`gather_rows`).

    Example:
        >>> import torch
        >>> source: PixelSource = TensorPixelSource(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]))
        >>> source.num_pixels, source.dim, source.gather(torch.tensor([3])).shape
        (4, 2, torch.Size([1, 2]))
    """

    num_pixels: int
    dim: int
    labels: Tensor

    def gather(self, index: Tensor) -> Tensor: ...


class TensorPixelSource:
    """A :class:`PixelSource` over an in-memory ``[n, d]`` tensor (tests, demos, benchmarks).

    Example:
        >>> import torch
        >>> src = TensorPixelSource(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 0]))
        >>> src.gather(torch.tensor([2, 0])).tolist()
        [[4.0, 5.0], [0.0, 1.0]]
    """

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        if features.ndim != 2 or labels.shape != features.shape[:1]:
            raise BenchError(f"features [n, d] and labels [n] expected, got {tuple(features.shape)} "
                             f"and {tuple(labels.shape)}")
        self.features = features
        self.labels = labels.long()
        self.num_pixels, self.dim = features.shape

    def gather(self, index: Tensor) -> Tensor:
        """float32 features of the pixels in ``index`` (int64 ``[n]``), in that order."""
        return take_rows(self.features, index).float()

    def gather_as(self, index: Tensor, dtype: torch.dtype) -> Tensor:
        """The same rows in ``dtype``, converted from the stored dtype without a float32 copy when possible.

        Example:
            >>> import torch
            >>> src = TensorPixelSource(torch.tensor([[1.0, 2.0], [3.0, 4.0]]).half(), torch.tensor([0, 1]))
            >>> src.gather_as(torch.tensor([1]), torch.bfloat16)
            tensor([[3., 4.]], dtype=torch.bfloat16)
        """
        return convert_rows(take_rows(self.features, index), dtype)


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def take_rows(table: Tensor, index: Tensor) -> Tensor:
    """``table.index_select(0, index)`` for a ``[n, d]`` CPU table, bit for bit, as a plain copy of rows.

    torch's CPU ``index_select`` is fast for integer tensors and slow for float ones: measured on
    this 2-core box, 640 rows of 8448 fp16 features took 6.6 ms against 0.7 ms through an int16
    view of the same bytes (fp32: 5.6 ms against ~1.5 ms). Reading the rows through an integer view
    of equal width moves the same bytes, so the result is identical.

    Example:
        >>> import torch
        >>> t = torch.tensor([[1.5, 2.0], [3.0, -0.25]]).half()
        >>> take_rows(t, torch.tensor([1, 0, 1])).tolist()
        [[3.0, -0.25], [1.5, 2.0], [3.0, -0.25]]
    """
    as_int = _SAME_WIDTH_INT.get(table.element_size())
    if as_int is None or not table.is_floating_point() or table.device.type != "cpu" or not table.is_contiguous():
        return table.index_select(0, index)
    return table.view(as_int).index_select(0, index).view(table.dtype)


def convert_rows(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``rows`` in ``dtype``; on CPU, fp16 -> bf16 goes through float32 (same values, faster).

    Every fp16 value is exact in float32, so the detour rounds once, like the direct cast. It is
    there because torch's CPU cast from fp16 to bf16 is not vectorised: measured on this 2-core box
    (640 x 8448 rows) 2-4x slower than the two vectorised casts together (benchmarks/README.md).

    Example:
        >>> import torch
        >>> convert_rows(torch.tensor([1.0009765625]).half(), torch.bfloat16)  # rounds to bf16's 8 bits
        tensor([1.], dtype=torch.bfloat16)
    """
    if rows.dtype == dtype:
        return rows
    if rows.dtype == torch.float16 and dtype == torch.bfloat16 and rows.device.type == "cpu":
        return rows.float().to(dtype)
    return rows.to(dtype)


def gather_rows(source: "PixelSource", index: Tensor, dtype: torch.dtype) -> Tensor:
    """Features of ``index`` in ``dtype``: ``source.gather`` for float32 (the reference path, unchanged),
    else the source's own ``gather_as(index, dtype)`` when it has one (no float32 copy of an fp16
    store), else ``gather`` then a cast.

    Example:
        >>> import torch
        >>> src = TensorPixelSource(torch.ones(3, 2), torch.tensor([0, 1, 0]))
        >>> gather_rows(src, torch.tensor([0, 2]), torch.bfloat16).dtype
        torch.bfloat16
    """
    if dtype == torch.float32:
        return source.gather(index).to(torch.float32)
    gather_as = getattr(source, "gather_as", None)
    if gather_as is not None:
        return gather_as(index, dtype)
    return convert_rows(source.gather(index), dtype)


def to_device(x: Tensor, y: Tensor, device: str, pinned: bool = False) -> tuple[Tensor, Tensor]:
    """Move a batch to ``device``; from pinned host memory the copies are non-blocking (CUDA).

    A non-blocking copy from pageable memory would be synchronous anyway, so ``pinned`` says whether
    the caller pinned the batch (the prefetch thread does, off the step's critical path).

    Example:
        >>> import torch
        >>> x, y = to_device(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "cpu")
        >>> x.device.type, y.device.type
        ('cpu', 'cpu')
    """
    non_blocking = pinned and str(device).startswith("cuda")
    return x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)


class _Prefetcher:
    """Loads step ``s + 1``'s pixels in a background thread while step ``s`` trains.

    Gathering features (sampling fp16 maps, indexing) and the MLP step run in torch ops that release
    the GIL, so they overlap. On CUDA the batch goes through pinned memory with a non-blocking copy.
    When members retire mid-epoch, the rows of the already-loaded batch are sliced the same way as
    ``perms``, so every member still sees exactly its own pixel stream.
    """

    def __init__(self, source: "PixelSource", perms: Tensor, batch: int, steps: int, device: str,
                 dtype: torch.dtype = torch.float32) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.source, self.perms, self.batch, self.steps = source, perms, batch, steps
        self.cuda = str(device).startswith("cuda")
        self.device, self.dtype = device, dtype
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = self.pool.submit(self._load, 0, perms)

    def _load(self, step: int, perms: Tensor) -> tuple[Tensor, Tensor]:
        index = perms[:, step * self.batch:(step + 1) * self.batch].long()  # [A, B]
        # Converted to the step's dtype here, in the loader thread: on CUDA a low-precision batch also
        # halves the pinned buffer and the host-to-device bytes.
        x = gather_rows(self.source, index.reshape(-1), self.dtype).view(index.shape[0], self.batch, -1)
        y = self.source.labels[index.reshape(-1)].view(index.shape[0], self.batch)
        if self.cuda:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def take(self, step: int) -> tuple[Tensor, Tensor]:
        x, y = self.pending.result()
        if step + 1 < self.steps:
            self.pending = self.pool.submit(self._load, step + 1, self.perms)
        x, y = to_device(x, y, self.device, pinned=self.cuda)
        return x, y.reshape(-1)

    def keep_rows(self, keep: list[int]) -> None:
        """Members retired: keep only these rows of the permutations and of the batch in flight."""
        self.perms = self.perms[keep]
        pending = self.pending
        self.pending = self.pool.submit(lambda: tuple(t[keep] for t in pending.result()))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _InlineLoader:
    """Gathers each step's pixels when the step asks for them: the :class:`_Prefetcher` interface, no thread.

    For sources whose gather is cheap (features in RAM): a ``[members*batch]`` row gather costs less
    than handing the work to a thread and back, and a second Python thread running torch ops beside
    the step's intra-op threads oversubscribes the cores. Same pixels, same order, one gather per step.
    """

    def __init__(self, source: "PixelSource", perms: Tensor, batch: int, device: str,
                 dtype: torch.dtype = torch.float32) -> None:
        self.source, self.perms, self.batch, self.device, self.dtype = source, perms, batch, device, dtype

    def take(self, step: int) -> tuple[Tensor, Tensor]:
        index = self.perms[:, step * self.batch:(step + 1) * self.batch].long().view(-1)  # [A*B]
        x = gather_rows(self.source, index, self.dtype).view(self.perms.shape[0], self.batch, -1)
        y = self.source.labels.index_select(0, index)  # faster than [index]
        return to_device(x, y, self.device)

    def keep_rows(self, keep: list[int]) -> None:
        self.perms = self.perms[keep]

    def close(self) -> None:
        pass


PREFETCH_MIN_BYTES = 1 << 20  # a cheap gather smaller than this per step is not worth a thread hand-off


def _prefetch_batches(source: PixelSource, config, device: str) -> bool:
    """Whether the next step's pixels load in a background thread (True) or each step gathers its own.

    Always for CUDA (pinned-memory copies overlap the step) and for a costly gather. A cheap gather
    (features in RAM) runs inline unless a core is left idle by torch's threads and the step's
    batch is large (``members * batch_size * dim * 4`` bytes >= ``PREFETCH_MIN_BYTES``): with every
    core running intra-op threads, a second Python thread running torch ops oversubscribes them
    (demo size, 2 threads on 2 cores, ``DensePixels``: 8.7 ms per step with the prefetch thread, 1.7 ms
    inline, at 5 features; 11.4 vs 6.4 ms at 864), and a small gather costs less than the hand-off.
    See benchmarks/bench_probe_small.py.

    ``config`` is a :class:`bench.probe.TrainConfig` (its ``members`` and ``batch_size``).

    Example:
        >>> import torch
        >>> from bench.probe import TrainConfig
        >>> src = TensorPixelSource(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]))
        >>> _prefetch_batches(src, TrainConfig(), "cpu")
        False
    """
    if str(device).startswith("cuda") or getattr(source, "gather_is_costly", False):
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    batch_bytes = config.members * config.batch_size * source.dim * 4
    return torch.get_num_threads() < cores and batch_bytes >= PREFETCH_MIN_BYTES

