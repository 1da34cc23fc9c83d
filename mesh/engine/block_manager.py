"""KV block bookkeeping: which block ids are free, preferring contiguous runs.

Pure Python, no torch. Free space is a set of maximal runs of consecutive ids.
A new request takes a run that can also hold its expected growth (best fit), so
its blocks, and hence its KV for one layer, usually form one contiguous span:
zero-copy for attention and one transfer op per layer. The growth is kept as
headroom after the request's last block, which later requests skip while any
other room is left. Freed blocks merge with free neighbours at once.
"""
from __future__ import annotations



class OutOfBlocks(Exception):
    """Fewer free blocks than asked for; the caller waits, preempts or rejects."""


class BlockManager:
    """Not thread-safe, by design: one thread owns it, the engine's. In an actor, leases
    and prefix holds reach it through the KV connector (mesh.kv), which runs their
    allocations and frees on the engine's thread between steps."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._runs: dict[int, int] = {0: num_blocks}  # start -> length of each free run
        self._run_ends: dict[int, int] = {num_blocks: 0}  # end (exclusive) -> start
        self._allocated = bytearray(num_blocks)
        # First free block after a growing request -> blocks it still expects to append.
        self._headroom: dict[int, int] = {}
        self.num_free = num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int, expected_total: int | None = None) -> list[int]:
        """n block ids, as few runs as possible.

        expected_total: blocks this request will grow to; a run that fits it is
        chosen so that later `append` calls extend the same span.
        """
        if n < 0:
            raise ValueError("cannot allocate a negative number of blocks")
        if n > self.num_free:
            raise OutOfBlocks(f"{n} blocks asked for, {self.num_free} free")
        ids: list[int] = []
        want = max(n, expected_total or n)
        while len(ids) < n:
            need = n - len(ids)
            start, at = self._best_place(max(need, want - len(ids)))
            ids.extend(self._take(start, at, min(need, start + self._runs[start] - at)))
        if want > n and ids:
            self._keep_headroom(ids[-1] + 1, want - n)
        return ids

    def append(self, block_ids: list[int]) -> int:
        """One more block for a growing request, right after its last block when free."""
        if self.num_free == 0:
            raise OutOfBlocks("no free block to grow into")
        nxt = block_ids[-1] + 1 if block_ids else None
        if nxt is not None and nxt in self._runs:
            left = self._headroom.pop(nxt, 0)
            (new,) = self._take(nxt, nxt, 1)
            self._keep_headroom(nxt + 1, left - 1)
        else:
            (new,) = self._take(*self._best_place(1), 1)
        block_ids.append(new)
        return new

    def free(self, block_ids: list[int]) -> None:
        seen: set[int] = set()
        for b in block_ids:
            if not 0 <= b < self.num_blocks or not self._allocated[b]:
                raise ValueError(f"block {b} freed but not allocated")
            if b in seen:
                raise ValueError(f"block {b} freed twice in one call")
            seen.add(b)
        for b in sorted(block_ids):
            self._allocated[b] = 0
            self._headroom.pop(b + 1, None)
            self._insert_run(b, 1)
        self.num_free += len(block_ids)

    def runs(self) -> list[tuple[int, int]]:
        """The free runs as (start, length), in id order (for tests and stats)."""
        return sorted(self._runs.items())

    def _best_place(self, want: int) -> tuple[int, int]:
        """(run start, first id to take) for `want` blocks: the smallest run that
        holds them past other requests' headroom, else the smallest that holds them
        at all (placed at its end, to keep what headroom it can), else the largest."""
        best = fallback = largest = None
        for start, length in self._runs.items():
            usable = length - self._headroom.get(start, 0)
            if usable >= want and (best is None or usable < best[0]):
                best = (usable, start, start + length - usable)
            if length >= want and (fallback is None or length < fallback[0]):
                fallback = (length, start, start + length - want)
            if largest is None or length > largest[0]:
                largest = (length, start, start)
        _, start, at = best or fallback or largest
        return start, at

    def _keep_headroom(self, start: int, n: int) -> None:
        if n > 0 and start in self._runs:
            self._headroom[start] = n

    def _take(self, start: int, at: int, n: int) -> range:
        """Take ids at..at+n from the free run beginning at `start`."""
        length = self._runs.pop(start)
        del self._run_ends[start + length]
        if at > start:
            self._runs[start] = at - start
            self._run_ends[at] = start
        if start + length > at + n:
            self._runs[at + n] = start + length - at - n
            self._run_ends[start + length] = at + n
        for b in range(at, at + n):
            self._allocated[b] = 1
            self._headroom.pop(b, None)
        self.num_free -= n
        return range(at, at + n)

    def _insert_run(self, start: int, length: int) -> None:
        end = start + length
        if start in self._run_ends:  # merge with the run ending here
            prev = self._run_ends.pop(start)
            length += self._runs.pop(prev)
            start = prev
        if end in self._runs:  # merge with the run starting here
            nxt_len = self._runs.pop(end)
            del self._run_ends[end + nxt_len]
            length += nxt_len
        self._runs[start] = length
        self._run_ends[start + length] = start
