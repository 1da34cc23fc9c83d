"""The decode side's receivers: one per tensor-parallel rank's KV pool, and reservations that span
them (one receiver, one part, for an engine without tensor parallelism).

A reservation's blocks are the same ids on every rank (rank 0's block manager hands them out).
It is cut into parts (transport.heads): per receiving rank, its heads, cut where a sender's ranks
change; each part is one lease on that rank's receiver, over the reservation's blocks. The first
part's lease id names the reservation. It commits once every part committed; when a part ends
without a commit, the others are aborted. Its blocks go back to the engine once: after the last
part ended, if any part ended without a commit (a lease table frees a part's blocks only once its
writer stopped, so no byte can land after). SharedBlocks counts the parts.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from transport import BlockReserver, KVReceiver, LeaseDescriptor, ReceivedKV, TransferError, TransferStats
from transport.heads import parts


@dataclass
class _Ending:
    left: int  # parts not ended yet
    freed: bool = False  # some part ended without a commit


class SharedBlocks:
    """The rank receivers' BlockReserver: a reservation's blocks go back to `engine` once."""

    def __init__(self, engine: BlockReserver):
        self._engine = engine
        self._ending: dict[tuple[int, ...], _Ending] = {}

    def allocate(self, n: int) -> list[int]:
        return self._engine.allocate(n)  # the engine's says how leases get their blocks

    def expect(self, block_ids: list[int], parts: int) -> None:
        self._ending[tuple(block_ids)] = _Ending(parts)

    def forget(self, block_ids: list[int]) -> None:
        """A reservation that failed to make its parts: its caller frees its blocks."""
        self._ending.pop(tuple(block_ids), None)

    def free(self, block_ids: list[int]) -> None:
        """A part ended without a commit and its writer stopped."""
        self._ended(block_ids, freed=True)

    def committed(self, block_ids: list[int]) -> None:
        self._ended(block_ids, freed=False)

    def _ended(self, block_ids: list[int], freed: bool) -> None:
        key = tuple(block_ids)
        ending = self._ending.get(key)
        if ending is None:
            return  # a forgotten reservation's part
        ending.left -= 1
        ending.freed |= freed
        if ending.left == 0:
            del self._ending[key]
            if ending.freed:
                self._engine.free(block_ids)


class RankReceivers:
    def __init__(self, receivers: Sequence[KVReceiver], heads: Sequence[range], blocks: SharedBlocks):
        """receivers[r]: rank r's, over its pool holding the model-wide KV heads heads[r]."""
        self.receivers = list(receivers)
        self.heads = list(heads)
        self.blocks = blocks
        self._parts: dict[str, list[tuple[KVReceiver, str]]] = {}
        self._commits: dict[str, asyncio.Task[ReceivedKV]] = {}

    def __len__(self) -> int:
        """Leases open on every rank's receiver (parts, for leak checks)."""
        return sum(len(rx.leases) for rx in self.receivers)

    def reserve(self, num_tokens: int, block_ids: list[int], senders: Sequence[Sequence[range]]
                ) -> tuple[LeaseDescriptor, ...]:
        """A reservation's parts, cut so that a rank of each sender (its ranks' heads) writes each."""
        cut = parts(self.heads, senders)
        self.blocks.expect(block_ids, len(cut))
        leases: list[tuple[KVReceiver, LeaseDescriptor]] = []
        try:
            for part in cut:
                rx = self.receivers[part.rank]
                leases.append((rx, rx.reserve(num_tokens, block_ids=block_ids, heads=part.heads)))
        except BaseException:
            self.blocks.forget(block_ids)
            for rx, lease in leases:
                rx.abort(lease.lease_id)
            raise
        key = leases[0][1].lease_id
        self._parts[key] = [(rx, lease.lease_id) for rx, lease in leases]
        self._commits[key] = asyncio.ensure_future(self._commit(key, block_ids, num_tokens))
        return tuple(lease for _, lease in leases)

    async def _commit(self, key: str, block_ids: list[int], num_tokens: int) -> ReceivedKV:
        """Every part's commit, or the first failure once every part ended."""
        leases = self._parts[key]
        waits = [asyncio.ensure_future(rx.wait(lease_id)) for rx, lease_id in leases]
        try:
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_EXCEPTION)
            if pending:  # a part failed: the others cannot make a whole KV
                for rx, lease_id in leases:
                    rx.abort(lease_id)
            results = await asyncio.gather(*waits, return_exceptions=True)
        finally:
            self._parts.pop(key, None)
        for result in results:
            if isinstance(result, ReceivedKV):
                self.blocks.committed(block_ids)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            raise failure
        return ReceivedKV(key, block_ids, num_tokens, TransferStats.merged([r.stats for r in results]))

    async def wait(self, lease_id: str, timeout_s: float | None = None) -> ReceivedKV:
        task = self._commits.get(lease_id)
        if task is None:
            raise TransferError("lease", "unknown lease", lease_id)
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except asyncio.TimeoutError:
            raise TransferError("timeout", "waiting for the commit", lease_id) from None
        finally:
            if task.done():
                self._commits.pop(lease_id, None)

    def renew(self, lease_id: str) -> bool:
        """Another time to live for every part; False once the reservation ended."""
        leases = self._parts.get(lease_id)
        return leases is not None and all([rx.renew(part) for rx, part in leases])

    def abort(self, lease_id: str) -> bool:
        leases = self._parts.get(lease_id)
        return leases is not None and any([rx.abort(part) for rx, part in leases])

    async def close(self) -> None:
        """Ends every reservation: the blocks of those not committed go back."""
        for rx in self.receivers:
            await rx.close()
        await asyncio.gather(*self._commits.values(), return_exceptions=True)
        self._commits.clear()
