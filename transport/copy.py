"""Moving a plan's bytes in memory: op views into a pool, and gather/scatter
through reusable staging buffers (where dtypes or devices differ, or the
allocation is too fragmented for one op per run).
"""

from __future__ import annotations

import threading

import torch

from .layout import byte_view, layer_tokens
from .memory import pool_zeros
from .plan import TransferPlan


def op_views(plan: TransferPlan, pool: torch.Tensor, layer: int, side: str) -> list[torch.Tensor]:
    """One flat uint8 view per op of a layer (no copies)."""
    flat = byte_view(pool)
    return [flat[off:off + n] for off, n in plan.byte_ranges(layer, side)]


def gather_layer(plan: TransferPlan, pool: torch.Tensor, layer: int, stage: torch.Tensor) -> None:
    """K then V of the request's tokens, in the receiver's dtype, into ``stage``."""
    dst = plan.dst_layout
    out = stage.view(dst.dtype).view(2, plan.num_tokens, dst.kv_heads, dst.head_dim)
    index = torch.from_numpy(plan.src_slots).to(pool.device)
    for kv in (0, 1):
        out[kv].copy_(layer_tokens(pool, layer, kv).index_select(0, index))


def scatter_layer(plan: TransferPlan, pool: torch.Tensor, layer: int, stage: torch.Tensor) -> None:
    dst = plan.dst_layout
    staged = stage.view(dst.dtype).view(2, plan.num_tokens, dst.kv_heads, dst.head_dim)
    index = torch.from_numpy(plan.dst_slots).to(pool.device)
    for kv in (0, 1):
        layer_tokens(pool, layer, kv).index_copy_(0, index, staged[kv].to(pool.device))


class StagingPool:
    """Host buffers reused across transfers: fresh pages are slow to touch."""

    def __init__(self, max_free: int = 64) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._max_free = max_free
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            bufs = self._free.get(nbytes)
            if bufs:
                return bufs.pop()
        return pool_zeros((nbytes,), torch.uint8)

    def give(self, bufs: list[torch.Tensor]) -> None:
        with self._lock:
            for buf in bufs:
                if sum(map(len, self._free.values())) < self._max_free:
                    self._free.setdefault(buf.numel(), []).append(buf)
