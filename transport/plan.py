"""Transfer plans: which token ranges move, as maximal contiguous runs.

Token t of a request lives in block ``ids[t // block_size]`` at slot
``t % block_size`` on each side, so the sender and receiver may use different
block sizes. A run is a range of tokens contiguous in both pools; it is one
byte range per (layer, K/V) and one transport op.

A plan may move a slice of the KV heads (tensor-parallel ranks hold a part of them): heads
[start, start + count) of each side's pool. A slice that is not every head of its pool is
strided (a token's heads are contiguous, the next token's are a pool row further): the ops stay
one per run, and that side copies each run's slice between its pool and a buffer the op moves
(one strided copy; copy.py), while a side that moves every head of its pool moves its own bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from .layout import KVLayout

# Past this many runs per layer and K/V, one gather into a staging buffer and
# one scatter on the receiver beat many small ops (P/D-Serve's RecvScatter).
DEFAULT_GATHER_THRESHOLD = 32


class Strategy(str, Enum):
    CONTIGUOUS = "contiguous"  # one op per maximal run; gathers past the threshold
    BLOCKS = "blocks"          # one op per block: the block-fixed baseline for benchmarks
    GATHER = "gather"          # always gather into staging and scatter on the receiver


@dataclass(frozen=True)
class HeadSlice:
    """KV heads [start, start + count) of one pool, in that pool's own numbering."""

    start: int
    count: int

    def within(self, layout: KVLayout) -> bool:
        return self.count > 0 and 0 <= self.start and self.start + self.count <= layout.kv_heads

    def whole(self, layout: KVLayout) -> bool:
        return (self.start, self.count) == (0, layout.kv_heads)


def token_slots(block_ids: list[int] | np.ndarray, block_size: int, num_tokens: int) -> np.ndarray:
    ids = np.asarray(block_ids, dtype=np.int64)
    if len(ids) * block_size < num_tokens:
        raise ValueError(f"{len(ids)} blocks of {block_size} cannot hold {num_tokens} tokens")
    t = np.arange(num_tokens, dtype=np.int64)
    return ids[t // block_size] * block_size + t % block_size


@dataclass(frozen=True)
class TransferPlan:
    """The same plan is computed on both sides from the same inputs."""

    strategy: Strategy
    num_tokens: int
    src_layout: KVLayout
    dst_layout: KVLayout
    src_slots: np.ndarray   # per token, slot in the source layer cache
    dst_slots: np.ndarray   # per token, slot in the destination layer cache
    run_starts: np.ndarray  # first token of each run
    run_lengths: np.ndarray
    src_heads: HeadSlice
    dst_heads: HeadSlice

    @property
    def gathers(self) -> bool:
        """Whether each layer moves as one op: gathered on the sender, scattered on the receiver."""
        return self.strategy is Strategy.GATHER

    def side(self, side: str) -> tuple[KVLayout, np.ndarray, HeadSlice]:
        """A side's ("src" or "dst") pool layout, token slots and KV heads."""
        if side == "src":
            return self.src_layout, self.src_slots, self.src_heads
        return self.dst_layout, self.dst_slots, self.dst_heads

    def whole(self, side: str) -> bool:
        """Whether a side ("src" or "dst") moves every KV head of its pool: then each op is a byte
        range of that pool (byte_ranges), else a strided slice of it."""
        layout, _, heads = self.side(side)
        return heads.whole(layout)

    @property
    def runs(self) -> int:
        return len(self.run_starts)

    @property
    def ops_per_layer(self) -> int:
        return 1 if self.gathers else 2 * self.runs

    @property
    def wire_token_bytes(self) -> int:
        return self.dst_heads.count * self.dst_layout.head_dim * self.dst_layout.itemsize

    @property
    def layer_bytes(self) -> int:
        return 2 * self.num_tokens * self.wire_token_bytes

    @property
    def total_bytes(self) -> int:
        return self.dst_layout.num_layers * self.layer_bytes

    def byte_ranges(self, layer: int, side: str) -> list[tuple[int, int]]:
        """(offset, length) of every op of a layer in the flat byte view of one pool (a side that
        moves its whole pool: see whole)."""
        layout, slots, _ = self.side(side)
        tb = layout.token_bytes
        ranges = []
        for kv in (0, 1):
            base = (layer * 2 + kv) * layout.slots
            for start, length in zip(self.run_starts.tolist(), self.run_lengths.tolist()):
                ranges.append(((base + int(slots[start])) * tb, length * tb))
        return ranges


def _run_breaks(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Boolean per token: True where a new run starts."""
    brk = np.ones(len(src), dtype=bool)
    brk[1:] = (np.diff(src) != 1) | (np.diff(dst) != 1)
    return brk


def build_plan(
    src_layout: KVLayout,
    src_block_ids: list[int],
    dst_layout: KVLayout,
    dst_block_ids: list[int],
    num_tokens: int,
    strategy: Strategy | str = Strategy.CONTIGUOUS,
    gather_threshold: int = DEFAULT_GATHER_THRESHOLD,
    src_heads: HeadSlice | None = None,
    dst_heads: HeadSlice | None = None,
) -> TransferPlan:
    """src_heads, dst_heads: the KV heads moved, out of and into each pool (default: all)."""
    strategy = Strategy(strategy)
    src_heads = src_heads or HeadSlice(0, src_layout.kv_heads)
    dst_heads = dst_heads or HeadSlice(0, dst_layout.kv_heads)
    for name, heads, layout in (("source", src_heads, src_layout), ("destination", dst_heads, dst_layout)):
        if not heads.within(layout):
            raise ValueError(f"{name} heads {heads.start}..{heads.start + heads.count - 1} are not among "
                             f"the {layout.kv_heads} KV heads of its pool")
    if not src_layout.compatible(dst_layout) or src_heads.count != dst_heads.count:
        raise ValueError("sender and receiver differ in layers, kv_heads or head_dim")
    if num_tokens <= 0:
        raise ValueError("num_tokens must be positive")
    src = token_slots(src_block_ids, src_layout.block_size, num_tokens)
    dst = token_slots(dst_block_ids, dst_layout.block_size, num_tokens)
    for name, slots, layout in (("source", src, src_layout), ("destination", dst, dst_layout)):
        if slots.min() < 0 or slots.max() >= layout.slots:
            raise ValueError(f"{name} block id out of range")
    brk = _run_breaks(src, dst)
    if strategy is Strategy.BLOCKS:
        t = np.arange(num_tokens)
        brk |= (t % src_layout.block_size == 0) | (t % dst_layout.block_size == 0)
    starts = np.flatnonzero(brk)
    lengths = np.diff(np.append(starts, num_tokens))
    # A byte copy cannot convert dtypes. Devices do not matter here: where each side's
    # bytes sit when they move (its pool, or host staging) is its path (path.py).
    converts = src_layout.dtype != dst_layout.dtype
    if strategy is Strategy.CONTIGUOUS and (len(starts) > gather_threshold or converts):
        strategy = Strategy.GATHER
    if strategy is Strategy.BLOCKS and converts:
        raise ValueError("the blocks strategy moves raw bytes: layouts must share dtype")
    return TransferPlan(strategy, num_tokens, src_layout, dst_layout, src, dst, starts, lengths,
                        src_heads, dst_heads)
