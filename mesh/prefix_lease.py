"""Decode side of prefix reuse: a lease covers only the prompt tokens past the longest prefix
this actor's own prefix cache holds, and the prefill actor sends only the KV after it.

The cached blocks a lease skips are held (one reference each) from the reservation on, and
released exactly once, by whichever comes first:
- the lease commits and the decode call takes them, with the received blocks, for the engine;
- the lease ends without a commit (released by the gateway, expired, aborted, the receiver
  closed): they are dropped at once, back to the cache's idle LRU;
- the decode call gives up waiting (or is cancelled), or the gateway releases the lease
  before any decode call took it (a request cancelled between its commit and its decode
  call): whatever lands is dropped.
A dead actor takes its blocks with it. `free` hands blocks to the engine's thread (the KV
connector's), which alone touches the block manager.

The end of a lease is seen by waiting on its commit from the reservation on: the lease
table's on_end callbacks fire on a commit and on an abort alike, and only the commit's
waiter tells them apart.
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable

from mesh.engine.prefix_cache import PrefixCache, block_hashes
from transport import ReceivedKV, TransferError


def skippable_tokens(num_tokens: int, block_size: int, align_tokens: int) -> int:
    """The most prompt tokens a lease may skip: whole blocks on this side and on the sender's
    (blocks of `align_tokens`), and never the whole prompt, so that a transfer still runs and
    commits the lease."""
    unit = math.lcm(block_size, max(1, align_tokens))
    return (num_tokens - 1) // unit * unit


def acquire_prefix(cache: PrefixCache, token_ids: list[int], align_tokens: int) -> list[int]:
    """Holds the cached blocks of the longest skippable prefix of the prompt (one reference each);
    the caller releases them with cache.free. On the thread that owns the cache (the engine's),
    so a block matched is held before any allocation can evict it."""
    bs = cache.block_size
    limit = skippable_tokens(len(token_ids), bs, align_tokens)
    unit_blocks = math.lcm(bs, max(1, align_tokens)) // bs
    hits = cache.match(block_hashes(token_ids[:limit], bs))
    hits = hits[:len(hits) // unit_blocks * unit_blocks]
    cache.acquire(hits)
    return hits


class PrefixHolds:
    """Held prefix blocks per lease, until the decode call takes them or the lease ends."""

    def __init__(self, free: Callable[[list[int]], None]):
        self._free = free
        self._landing: dict[str, asyncio.Task[list[int]]] = {}

    def __len__(self) -> int:
        """Leases whose blocks nobody took yet (for leak checks)."""
        return len(self._landing)

    def hold(self, lease_id: str, held: list[int], commit: Awaitable[ReceivedKV]) -> None:
        """`held` now waits for `commit`, the wait on the lease's commit (it fails when the lease
        ends otherwise)."""
        task = asyncio.ensure_future(self._land(held, commit))
        self._landing[lease_id] = task
        task.add_done_callback(lambda t: self._forget_failed(lease_id, t))

    async def take(self, lease_id: str, timeout_s: float | None) -> list[int]:
        """Every block of the request's prompt KV once its lease committed: the held prefix, then
        the received blocks. The caller owns them from here on."""
        task = self._landing.get(lease_id)
        if task is None:
            raise TransferError("lease", "unknown lease, or it ended without a commit", lease_id)
        try:
            blocks = await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except asyncio.TimeoutError:
            self._abandon(lease_id, task)
            raise TransferError("timeout", f"the KV did not arrive within {timeout_s}s", lease_id) from None
        except BaseException:  # the lease ended without a commit, or the decode call was cancelled
            self._abandon(lease_id, task)
            raise
        if self._landing.pop(lease_id, None) is not task:  # released meanwhile: dropped there
            raise TransferError("lease", "the lease was released before the decode took it", lease_id)
        return blocks

    def release(self, lease_id: str) -> None:
        """The gateway gave the lease up: if no decode call took its blocks, drop them once landed."""
        task = self._landing.get(lease_id)
        if task is not None:
            self._abandon(lease_id, task)

    async def _land(self, held: list[int], commit: Awaitable[ReceivedKV]) -> list[int]:
        try:
            received = await commit
        except BaseException:
            self._free(held)
            raise
        return held + received.block_ids

    def _abandon(self, lease_id: str, task: asyncio.Task) -> None:
        """Nobody will take this lease's blocks: those of a commit that lands later are dropped."""
        if self._landing.pop(lease_id, None) is not None:
            task.add_done_callback(self._drop_landed)

    def _drop_landed(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is None:
            self._free(task.result())

    def _forget_failed(self, lease_id: str, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:  # its held blocks are already freed
            if self._landing.get(lease_id) is task:
                del self._landing[lease_id]
