"""The paged KV cache: one tensor per actor, [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim].

Per layer, K and V are each `[num_blocks, block_size, kv_heads, head_dim]`, so a
run of consecutive block ids is one contiguous span of memory, and the whole
pool is one region for the transport to register once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block holds across all layers, K and V."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    @property
    def dims(self) -> tuple[int, ...]:
        """The pool tensor's shape."""
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)


# allocate(shape, dtype, device) -> a zeroed contiguous tensor
Allocator = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


class KVCache:
    def __init__(self, shape: KVShape, device: torch.device, allocate: Allocator = zeros):
        """allocate: where the pool's memory comes from; an actor whose KV the transport moves
        passes the transport's allocator (on CPU: huge pages, which it copies faster)."""
        self.shape = shape
        self.pool = allocate(shape.dims, shape.dtype, device)  # touched now, not on the first request

    def layer_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a layer viewed as [num_blocks * block_size, kv_heads, head_dim] token slots."""
        s = self.shape
        kv = self.pool[layer].view(2, s.num_blocks * s.block_size, s.num_kv_heads, s.head_dim)
        return kv[0], kv[1]

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of these blocks' KV: [layers, 2, len(block_ids), block_size, kv_heads, head_dim]."""
        return self.pool[:, :, self._index(block_ids)].clone() if block_ids else self._empty()

    def import_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Writes KV shaped like export_blocks' result into these blocks."""
        want = (*self.pool.shape[:2], len(block_ids), *self.pool.shape[3:])
        if tuple(data.shape) != want:
            raise ValueError(f"KV data shaped {tuple(data.shape)}, expected {want}")
        self.pool[:, :, self._index(block_ids)] = data.to(self.pool.dtype)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copies each (source, destination) block's KV in every layer."""
        src, dst = zip(*pairs)
        self.pool[:, :, list(dst)] = self.pool[:, :, list(src)]

    def _index(self, block_ids: list[int]) -> torch.Tensor | slice:
        first = block_ids[0]
        if block_ids == list(range(first, first + len(block_ids))):
            return slice(first, first + len(block_ids))
        return torch.tensor(block_ids, dtype=torch.long, device=self.pool.device)

    def _empty(self) -> torch.Tensor:
        return self.pool[:, :, :0].clone()
