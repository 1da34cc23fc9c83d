"""The KV connector's worker side: moves KV bytes, and decides nothing about blocks.

An actor's KV is one pool per tensor-parallel rank (one for an engine without), each holding
some of the model's KV heads, for the same block ids. Receiving: one transport receiver per
rank's pool (RankReceivers); its leases come with blocks the scheduler side took (it never
allocates) and give them back through the scheduler side's EngineBlocks. Sending: a prefilled
request's blocks into a decode actor's reservation, one transfer per part, each from the rank
that holds the part's heads, straight out of that rank's pool (RankTransfers drives them as
one); layer by layer (a fault point after each layer), over one sender per backend, kept for
later transfers.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mesh.engine.shard import kv_head_ranges
from mesh.faults import FaultPoints
from mesh.kv.rank_receivers import RankReceivers, SharedBlocks
from transport import (BlockReserver, KVSender, LeaseDescriptor, Transfer, TransferError, TransferState,
                       TransferStats, TransportConfig, make_receiver, make_sender)
from transport.heads import sending_ranks
from transport.layout import KVLayout

if TYPE_CHECKING:
    from mesh.engine.engine import Engine


@dataclass(frozen=True)
class RankPool:
    """One tensor-parallel rank's KV pool, as this process maps it, and the model-wide KV heads it holds."""
    pool: torch.Tensor
    layout: KVLayout
    heads: range

    @classmethod
    def of_engine(cls, engine: Engine) -> list[RankPool]:
        """Every rank's pool of an engine whose ranks' pools this process maps (engine.rank_pools)."""
        kv = engine.kv.shape
        heads = kv_head_ranges(engine.model_config, engine.config.tensor_parallel_size)
        return [cls(pool, KVLayout(kv.num_layers, kv.num_blocks, kv.block_size, len(held), kv.head_dim, kv.dtype,
                                   engine.device.type), held)
                for pool, held in zip(engine.rank_pools, heads)]


class RankTransfers(Transfer):
    """One request's KV into every part of a reservation: one transfer per part, driven as one."""

    def __init__(self, transfers: list[Transfer]):
        self._transfers = transfers

    @property
    def state(self) -> TransferState:
        """Failed when a part failed, else the least advanced part's."""
        states = [t.state for t in self._transfers]
        return TransferState.FAILED if TransferState.FAILED in states else min(states, key=list(TransferState).index)

    @property
    def num_layers(self) -> int:
        return self._transfers[0].num_layers

    def layer_ready(self, layer: int) -> None:
        for transfer in self._transfers:
            transfer.layer_ready(layer)

    async def finish(self, timeout_s: float | None = None) -> TransferStats:
        try:
            return TransferStats.merged(await asyncio.gather(*(t.finish(timeout_s) for t in self._transfers)))
        except BaseException:  # one part failed: the reservation cannot commit, the rest stop
            await self.abort()
            raise

    async def abort(self, reason: str = "aborted by sender") -> None:
        await asyncio.gather(*(t.abort(reason) for t in self._transfers))


class KVWorker:
    def __init__(self, pools: Sequence[RankPool], transport: TransportConfig, faults: FaultPoints):
        """pools: every rank's, rank 0's first."""
        self.pools = list(pools)
        self.transport = transport
        self.faults = faults
        self.receiver: RankReceivers | None = None
        self._senders: dict[str, KVSender] = {}

    async def open_receiver(self, reserver: BlockReserver) -> RankReceivers:
        if self.receiver is None:
            blocks = SharedBlocks(reserver)
            receivers = []
            try:
                for i, rank in enumerate(self.pools):
                    # a fixed port is rank 0's; the other ranks' receivers listen on the ports after it
                    config = dataclasses.replace(self.transport, port=self.transport.port + i if self.transport.port else 0)
                    receivers.append(make_receiver(config, rank.pool, rank.layout, blocks, first_head=rank.heads.start))
                    await receivers[-1].start()
            except BaseException:
                for rx in receivers:
                    await rx.close()
                raise
            self.receiver = RankReceivers(receivers, [rank.heads for rank in self.pools], blocks)
        return self.receiver

    async def close_receiver(self) -> None:
        """Ends every lease: their blocks go back to the reserver."""
        if self.receiver is not None:
            receiver, self.receiver = self.receiver, None
            await receiver.close()

    async def send(self, request_id: str, leases: tuple[LeaseDescriptor, ...], blocks: list[int]) -> TransferStats:
        """The KV that is computed already, layer by layer (a fault point after each layer)."""
        transfer = await self.start(leases, blocks)
        try:
            for layer in range(transfer.num_layers):
                transfer.layer_ready(layer)
                if self.faults.faults:
                    await asyncio.sleep(0.05)  # the layer goes on the wire before a fault here kills the actor
                    self.faults.reached("transfer_after_layers", request_id, layer + 1)
        except BaseException:
            await transfer.abort()
            raise
        return await self.finish(transfer)

    async def start(self, leases: tuple[LeaseDescriptor, ...], blocks: list[int]) -> Transfer:
        """A transfer of these blocks into every part of a reservation, each agreed with its
        receiver and sent by the rank holding its heads; layers follow."""
        wanted = [(lease.head_range.start, lease.head_range.stop) for lease in leases]
        try:
            ranks = sending_ranks([rank.heads for rank in self.pools], wanted)
        except ValueError as e:
            raise TransferError("plan", str(e), leases[0].lease_id) from None
        transfers: list[Transfer] = []
        try:
            for lease, r in zip(leases, ranks):
                rank = self.pools[r]
                transfers.append(await self._sender(lease.backend).start(lease, rank.pool, rank.layout, blocks,
                                                                         first_head=rank.heads.start))
        except BaseException:
            await asyncio.gather(*(t.abort() for t in transfers))
            raise
        return RankTransfers(transfers)

    async def finish(self, transfer: Transfer) -> TransferStats:
        """Waits for the commit of a transfer that got every layer."""
        try:
            return await transfer.finish(self.transport.timeout_s)
        except BaseException:  # cancelled: the receiver frees the lease once the connection closes
            await transfer.abort()
            raise

    def _sender(self, backend: str) -> KVSender:
        if backend not in self._senders:
            self._senders[backend] = make_sender(dataclasses.replace(self.transport, backend=backend))
        return self._senders[backend]

    async def close(self) -> None:
        await self.close_receiver()
        for sender in self._senders.values():
            await sender.close()
        self._senders.clear()
