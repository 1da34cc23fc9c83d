"""The typed description of one actor's KV pool, and byte views into it.

A pool is ONE contiguous tensor ``[num_layers, 2, num_blocks, block_size,
kv_heads, head_dim]`` (index 0 = K, 1 = V), so the whole pool registers with
UCX once and every (layer, K/V, token slot) is a fixed byte offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .memory import pool_zeros

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}; supported: {sorted(_DTYPES)}")


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "kv_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int")
        dtype_name(self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.kv_heads, self.head_dim)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def token_bytes(self) -> int:
        """Bytes of one token of one layer's K (or V)."""
        return self.kv_heads * self.head_dim * self.itemsize

    @property
    def slots(self) -> int:
        """Token slots in one layer's K (or V) cache."""
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def compatible(self, other: KVLayout) -> bool:
        """Whether KV can move between the two pools (the plan converts the rest; it checks
        that both sides move as many heads)."""
        return (self.num_layers, self.head_dim) == (other.num_layers, other.head_dim)

    def allocate(self) -> torch.Tensor:
        return pool_zeros(self.shape, self.dtype, self.device)

    def check_pool(self, pool: torch.Tensor) -> None:
        if tuple(pool.shape) != self.shape or pool.dtype != self.dtype:
            raise ValueError(f"pool {tuple(pool.shape)} {pool.dtype} does not match {self}")
        if not pool.is_contiguous():
            raise ValueError("the KV pool must be one contiguous tensor")

    def to_wire(self) -> dict:
        return {
            "num_layers": self.num_layers, "num_blocks": self.num_blocks,
            "block_size": self.block_size, "kv_heads": self.kv_heads,
            "head_dim": self.head_dim, "dtype": dtype_name(self.dtype), "device": self.device,
        }

    @classmethod
    def from_wire(cls, d: dict) -> KVLayout:
        if d.get("dtype") not in _DTYPES:
            raise ValueError(f"unsupported KV dtype {d.get('dtype')!r}")
        return cls(
            num_layers=d["num_layers"], num_blocks=d["num_blocks"], block_size=d["block_size"],
            kv_heads=d["kv_heads"], head_dim=d["head_dim"], dtype=_DTYPES[d["dtype"]],
            device=str(d.get("device", "cpu")),
        )


def layer_tokens(pool: torch.Tensor, layer: int, kv: int) -> torch.Tensor:
    """One layer's K or V cache as ``[slots, kv_heads, head_dim]`` (a view)."""
    part = pool[layer, kv]
    return part.view(-1, part.shape[-2], part.shape[-1])


def byte_view(pool: torch.Tensor) -> torch.Tensor:
    """The pool as a flat uint8 view: every op of a plan is a byte range of it."""
    return pool.view(-1).view(torch.uint8)
