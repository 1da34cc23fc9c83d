"""The KV connector's scheduler side: which blocks a lease holds, and when blocks go back.

It decides how much of a prompt a lease skips (the longest prefix the decode actor's own
prefix cache holds, in whole blocks of both sides), reserves the rest, holds the skipped
prefix blocks until the decode call takes them with the received ones (PrefixHolds), and
picks the blocks of a prefilled request that go out.

Invariant: only the engine's thread touches the block manager. A reservation's prefix hold
and its lease blocks are taken in one engine command (AsyncEngine.call), so no step can evict
or take them in between; frees of ended leases and dropped holds are queued to that thread
(AsyncEngine.post). A caller cancelled while its command is queued leaves nothing taken.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from mesh.async_engine import AsyncEngine
from mesh.engine.block_manager import OutOfBlocks
from mesh.engine.prefix_cache import PrefixCache
from mesh.errors import MeshError
from mesh.prefix_lease import PrefixHolds, acquire_prefix
from mesh.kv.rank_receivers import RankReceivers
from transport import LeaseDescriptor, TransferError


@dataclass(frozen=True)
class Reservation:
    """A lease for a request's prompt KV past the prefix this actor holds already: one part per
    receiving rank and head range (RankReceivers), the first naming it."""
    leases: tuple[LeaseDescriptor, ...]
    prefix_tokens: int  # of the prompt, held here and left out of the lease
    prefix_blocks: int

    @property
    def lease_id(self) -> str:
        return self.leases[0].lease_id


class EngineBlocks:
    """The engine's blocks as the transport's lease table sees them (transport.BlockReserver):
    a lease gets its blocks on the engine's thread before the receiver makes it, and the
    blocks of one that ends without a commit are freed there."""

    def __init__(self, engine: AsyncEngine):
        self._engine = engine

    def allocate(self, n: int) -> list[int]:
        raise RuntimeError("an actor's leases get their blocks on the engine's thread: reserve through "
                           "the KV connector (mesh.kv), which hands them to the receiver")

    def free(self, block_ids: list[int]) -> None:
        if block_ids:
            self._engine.post(self._engine.engine.blocks.free, list(block_ids))


class KVScheduler:
    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._blocks = engine.engine.blocks  # touched only in functions run on the engine's thread
        self.block_size = self._blocks.block_size
        self.engine_blocks = EngineBlocks(engine)
        self.holds = PrefixHolds(self.engine_blocks.free)

    # -- decode side ---------------------------------------------------------------------------
    async def reserve(self, receiver: RankReceivers, prompt_ids: list[int], align_tokens: int,
                      senders: list[list[range]]) -> Reservation:
        """Holds the longest skippable cached prefix and reserves a lease for the rest, in parts
        that a rank of each sender (its ranks' KV heads) can write."""
        if not prompt_ids:
            raise MeshError("invalid_argument", "the prompt is empty: a lease needs at least one token")
        try:
            hits, blocks = await self._taking(self._take_blocks, list(prompt_ids), align_tokens)
        except OutOfBlocks as e:
            raise MeshError("resource_exhausted", f"no room for {len(prompt_ids)} tokens of KV: {e}",
                            retry_after_s=0.1) from None
        skip = len(hits) * self.block_size
        try:
            leases = receiver.reserve(len(prompt_ids) - skip, blocks, senders)
        except Exception as e:  # the lease table said no
            self.engine_blocks.free(hits + blocks)
            raise MeshError("resource_exhausted", f"no room for {len(prompt_ids) - skip} tokens of KV: {e}",
                            retry_after_s=0.1) from None
        lease_id = leases[0].lease_id
        self.holds.hold(lease_id, hits, receiver.wait(lease_id))
        return Reservation(leases, skip, len(hits))

    def _take_blocks(self, prompt_ids: list[int], align_tokens: int) -> tuple[list[int], list[int]]:
        """On the engine's thread: the held prefix and the lease's blocks, or nothing."""
        cache = self._blocks
        hits = acquire_prefix(cache, prompt_ids, align_tokens) if isinstance(cache, PrefixCache) else []
        try:
            return hits, cache.allocate(cache.blocks_for(len(prompt_ids) - len(hits) * self.block_size))
        except OutOfBlocks:
            cache.free(hits)
            raise

    async def _taking(self, take: Callable, *args) -> tuple[list[int], list[int]]:
        """take(*args) on the engine's thread; a caller cancelled meanwhile gives back what it took."""
        task = asyncio.ensure_future(self._engine.call(take, *args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._give_back)
            raise

    def _give_back(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is None:
            hits, blocks = task.result()
            self.engine_blocks.free(hits + blocks)

    def release(self, receiver: RankReceivers | None, lease_id: str) -> bool:
        """The gateway gave the lease up: its blocks go back whether or not it committed."""
        self.holds.release(lease_id)  # committed but never taken: its blocks go too
        return receiver.abort(lease_id) if receiver is not None else False

    async def take(self, receiver: RankReceivers, lease_id: str, timeout_s: float,
                   add: Callable[[list[int]], str]) -> Callable[[], str]:
        """Waits for the lease's commit; returns add(blocks of the whole prompt KV) for the engine's
        thread, which gives the blocks to the engine's request, or back if add fails."""
        try:
            blocks = await self.holds.take(lease_id, timeout_s)
        except TransferError as e:
            receiver.abort(lease_id)  # not committed in time: free its blocks now
            raise MeshError("unavailable", f"KV never arrived: {e}") from None

        def adopt() -> str:
            try:
                return add(blocks)
            except Exception:
                self._blocks.free(blocks)  # the held prefix and the received blocks are ours since the commit
                raise
        return adopt

    # -- prefill side --------------------------------------------------------------------------
    def skipped_blocks(self, skip_tokens: int) -> int:
        """How many of a prefilled request's blocks the lease skips (whole blocks only)."""
        bs = self.block_size
        if skip_tokens % bs:
            raise MeshError("invalid_argument", f"the lease skips {skip_tokens} tokens, not whole blocks of {bs}: "
                            "reserve with this actor's block size as alignment")
        return skip_tokens // bs

    async def outgoing_blocks(self, request_id: str, skip_tokens: int) -> list[int]:
        """The blocks of a prefilled request past the prefix the lease skips."""
        skip = self.skipped_blocks(skip_tokens)
        return (await self._engine.call(self._engine.engine.held_blocks, request_id))[skip:]

    async def request_finished(self, request_id: str) -> None:
        """The request is done here (sent, failed or cancelled): its blocks go back."""
        await self._engine.call(self._engine.engine.abort, request_id)  # a no-op once released
