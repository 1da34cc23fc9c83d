"""KVConnector: the one object an actor calls for KV beyond its own requests.

Decode role: reserve a lease (skipping the prefix held here), renew or release it, and take
its blocks for the decode batch once the prefill committed. Prefill role: send a prefilled
request's KV into a lease (with `layerwise`, each layer as its prefill computes it: `stream`
before the request is added), then let its blocks go. The scheduler side decides and is the only
path to the block manager (on the engine's thread); the worker side moves the bytes.
Results are small typed values; the actor turns them into its messages at its edge.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mesh.async_engine import AsyncEngine
from mesh.errors import MeshError
from mesh.faults import FaultPoints
from mesh.kv.layer_stream import LayerStreams
from mesh.kv.rank_receivers import RankReceivers
from mesh.kv.scheduler_side import KVScheduler, Reservation
from mesh.kv.worker_side import KVWorker, RankPool
from transport import LeaseDescriptor, TransferStats, TransportConfig


@dataclass(frozen=True)
class Sent:
    """A prefilled request's KV, written into a lease and committed there."""
    stats: TransferStats
    blocks: int  # sent from this actor
    skipped_tokens: int  # of the prompt, held by the receiver already
    seconds: float  # from the first token to the commit: the transfer's exposed part


class KVConnector:
    def __init__(self, engine: AsyncEngine, transport: TransportConfig, pools: list[RankPool], faults: FaultPoints,
                 layerwise: bool = False):
        """pools: the engine's KV pool of every tensor-parallel rank (rank 0's first).
        layerwise: prefills send each layer as soon as it is computed (the engine's layer_hook)."""
        self.transport = transport
        self.scheduler = KVScheduler(engine)
        self.worker = KVWorker(pools, transport, faults)
        self.streams = LayerStreams(self.worker.start) if layerwise else None
        if self.streams is not None:
            engine.engine.layer_hook = self.streams.on_layer  # set before any step runs

    @property
    def receiving(self) -> bool:
        return self.worker.receiver is not None

    @property
    def pending_leases(self) -> int:
        """Leases reserved here whose blocks no decode call took yet (drains wait for them)."""
        return len(self.scheduler.holds)

    async def open_receiver(self) -> None:
        await self.worker.open_receiver(self.scheduler.engine_blocks)

    async def close_receiver(self) -> None:
        await self.worker.close_receiver()

    async def close(self) -> None:
        await self.worker.close()

    # -- decode role -----------------------------------------------------------------------------
    async def reserve(self, prompt_ids: list[int], align_tokens: int = 1,
                      senders: list[list[range]] | None = None) -> Reservation:
        """senders: the KV heads of each rank of every sender that may write the lease (one list per
        tensor-parallel size; default: senders split as this actor is): the lease comes in parts
        that one rank of each can write."""
        receiver = self._receiver()
        return await self.scheduler.reserve(receiver, prompt_ids, align_tokens, senders or [receiver.heads])

    def renew_lease(self, lease_id: str) -> bool:
        """Another lease_ttl_s for a lease whose prefill is queued or running; False once it ended."""
        return self.worker.receiver.renew(lease_id) if self.worker.receiver is not None else False

    def release_lease(self, lease_id: str) -> bool:
        return self.scheduler.release(self.worker.receiver, lease_id)

    async def take(self, lease_id: str, add: Callable[[list[int]], str]) -> Callable[[], str]:
        """Once the lease committed: add(blocks) for the engine's thread (see KVScheduler.take)."""
        return await self.scheduler.take(self._receiver(), lease_id, self.transport.lease_ttl_s, add)

    def _receiver(self) -> RankReceivers:
        if self.worker.receiver is None:
            raise MeshError("unavailable", "this actor receives no KV: it serves no decode role")
        return self.worker.receiver

    # -- prefill role ----------------------------------------------------------------------------
    @property
    def layerwise(self) -> bool:
        return self.streams is not None

    def stream(self, request_id: str, leases: tuple[LeaseDescriptor, ...], skip_tokens: int) -> None:
        """Before a prefill is added (layerwise only): its layers go into the lease's parts as computed."""
        self.streams.open(request_id, leases, self.scheduler.skipped_blocks(skip_tokens))

    async def send(self, request_id: str, leases: tuple[LeaseDescriptor, ...], skip_tokens: int) -> Sent:
        """Writes a prefilled request's KV past the lease's skipped prefix (or, when it streamed,
        what is left of it) and waits for the commit."""
        start = time.perf_counter()
        if self.streams is not None and request_id in self.streams:
            transfer, blocks = await self.streams.transfer_of(request_id)
            stats = await self.worker.finish(transfer)
        else:
            sent = await self.scheduler.outgoing_blocks(request_id, skip_tokens)
            blocks, start = len(sent), time.perf_counter()
            stats = await self.worker.send(request_id, leases, sent)
        return Sent(stats, blocks, skip_tokens, time.perf_counter() - start)

    async def request_finished(self, request_id: str) -> None:
        """The request is done here (sent, failed or cancelled): a stream still running stops, then
        its blocks go back."""
        if self.streams is not None:
            await self.streams.close(request_id)
        await self.scheduler.request_finished(request_id)
