"""Moving a plan's bytes in memory: op views into a pool, copies between a pool's
runs and a buffer's ops (staged, or a strided head slice: one copy per run, no
index), and gather/scatter through reusable buffers (where dtypes differ, or the
allocation is too fragmented for one op per run). Copies into or out of host
memory are non-blocking: on an accelerator they run on the caller's current stream.
"""

from __future__ import annotations

import bisect
import threading

import torch

from collections.abc import Callable

import numpy as np

from .layout import byte_view, layer_tokens
from .memory import host_buffer
from .plan import HeadSlice, TransferPlan


def op_views(plan: TransferPlan, pool: torch.Tensor, layer: int, side: str) -> list[torch.Tensor]:
    """One flat uint8 view per op of a layer (no copies)."""
    flat = byte_view(pool)
    return [flat[off:off + n] for off, n in plan.byte_ranges(layer, side)]


def op_slices(plan: TransferPlan, pool: torch.Tensor, layer: int, side: str) -> list[torch.Tensor]:
    """One view per op of a layer, [run tokens, heads moved, head_dim] in the pool's dtype: the
    side's heads of each run, strided where they are a slice of the pool's (no copies)."""
    _, slots, heads = plan.side(side)
    runs = list(zip(slots[plan.run_starts].tolist(), plan.run_lengths.tolist()))
    caches = [_heads(pool, layer, kv, heads) for kv in (0, 1)]
    return [cache[start:start + length] for cache in caches for start, length in runs]


def buffered_ops(plan: TransferPlan, pool: torch.Tensor, layer: int, side: str,
                 buf: torch.Tensor) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """A layer's ops as consecutive slices of ``buf``, and the copy between them and the pool
    (into ``buf`` on the sender, out of it on the receiver): one copy per op."""
    slices = op_slices(plan, pool, layer, side)
    wire = split(buf, [s.numel() * s.element_size() for s in slices])
    typed = [w.view(s.dtype).view(s.shape) for w, s in zip(wire, slices)]
    pairs = list(zip(typed, slices)) if side == "src" else list(zip(slices, typed))

    def copy() -> None:
        for dst, src in pairs:
            copy_view(dst, src)
    return wire, copy


# an integer type of each item size, which numpy has: a CPU copy moves raw items, whatever the dtype
_ITEMS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def copy_view(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src, two views of one shape and dtype, either strided. Between CPU tensors numpy
    copies on the calling thread alone: torch would fan the copy out to the intra-op threads
    the engine computes on, and where those are busy wait for them (on 2 loaded cores a
    4 MiB copy took 7 ms so, 0.5 ms alone)."""
    if dst.device.type == src.device.type == "cpu":
        item = _ITEMS[dst.element_size()]
        np.copyto(dst.view(item).numpy(), src.view(item).numpy())
    else:
        dst.copy_(src, non_blocking=True)


def split(buf: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Consecutive slices of a flat buffer, one per size (views)."""
    return list(torch.split(buf[:sum(sizes)], sizes)) if sizes else []


def slot_index(slots: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(slots).to(device)


def gather_layer(plan: TransferPlan, pool: torch.Tensor, layer: int, stage: torch.Tensor,
                 index: torch.Tensor) -> None:
    """K then V of the request's tokens (``index``: their source slots), in the receiver's
    dtype, into ``stage`` (on the pool's device or in pinned host memory)."""
    out = _staged(plan, stage)
    for kv in (0, 1):
        out[kv].copy_(_heads(pool, layer, kv, plan.src_heads).index_select(0, index), non_blocking=True)


def scatter_layer(plan: TransferPlan, pool: torch.Tensor, layer: int, stage: torch.Tensor,
                  index: torch.Tensor) -> None:
    """The inverse of gather_layer; ``index``: the destination slots."""
    staged = _staged(plan, stage)
    for kv in (0, 1):
        _heads(pool, layer, kv, plan.dst_heads).index_copy_(0, index, staged[kv].to(pool.device, non_blocking=True))


def _staged(plan: TransferPlan, stage: torch.Tensor) -> torch.Tensor:
    """A layer's staging buffer as [K/V, tokens, heads moved, head_dim] in the receiver's dtype."""
    dst = plan.dst_layout
    return stage.view(dst.dtype).view(2, plan.num_tokens, plan.dst_heads.count, dst.head_dim)


def _heads(pool: torch.Tensor, layer: int, kv: int, heads: HeadSlice) -> torch.Tensor:
    """One layer's K or V cache, the plan's heads only: [slots, heads, head_dim] (a strided view)."""
    return layer_tokens(pool, layer, kv)[:, heads.start:heads.start + heads.count]


class StagingPool:
    """Buffers reused across transfers: fresh pages are slow to touch (about 0.5 GB/s on the
    CPU), and pinning is slower. Requests differ in length: a take gets the first nbytes of the
    smallest free buffer that holds them, and a new buffer is rounded up (by at most an eighth)
    so that slightly longer requests reuse it too. The max_free largest free buffers stay."""

    def __init__(self, allocate: Callable[[int], torch.Tensor] = host_buffer, max_free: int = 64) -> None:
        self._allocate = allocate
        self._free: list[torch.Tensor] = []  # smallest first
        self._lent: dict[int, torch.Tensor] = {}  # by data_ptr: what a taken view is the start of
        self._max_free = max_free
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fit = next((i for i, buf in enumerate(self._free) if buf.numel() >= nbytes), None)
            buf = None if fit is None else self._free.pop(fit)
        if buf is None:
            buf = self._allocate(_rounded(nbytes))
        with self._lock:
            self._lent[buf.data_ptr()] = buf
        return buf[:nbytes]

    def give(self, bufs: list[torch.Tensor]) -> None:
        """Taken buffers (the views take returned) come back."""
        with self._lock:
            for view in bufs:
                bisect.insort(self._free, self._lent.pop(view.data_ptr()), key=torch.Tensor.numel)
            del self._free[:max(0, len(self._free) - self._max_free)]


def _rounded(nbytes: int) -> int:
    """nbytes rounded up to a multiple of an eighth of its highest power of two."""
    step = 1 << max(nbytes.bit_length() - 4, 0)
    return -(-nbytes // step) * step
