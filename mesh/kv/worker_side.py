"""The KV connector's worker side: moves KV bytes, and decides nothing about blocks.

Receiving: the transport's receiver on this actor's KV pool; its leases come with blocks the
scheduler side took (it never allocates) and give them back through the scheduler side's
EngineBlocks. Sending: a prefilled request's blocks into a decode actor's lease, layer by
layer (a fault point after each layer), over one sender per backend, kept for later transfers.
"""
from __future__ import annotations

import asyncio
import dataclasses

import torch

from mesh.faults import FaultPoints
from transport import (BlockReserver, KVReceiver, KVSender, LeaseDescriptor, Transfer, TransferStats,
                       TransportConfig, make_receiver, make_sender)
from transport.layout import KVLayout


class KVWorker:
    def __init__(self, pool: torch.Tensor, layout: KVLayout, transport: TransportConfig, faults: FaultPoints):
        self.pool = pool
        self.layout = layout
        self.transport = transport
        self.faults = faults
        self.receiver: KVReceiver | None = None
        self._senders: dict[str, KVSender] = {}

    async def open_receiver(self, reserver: BlockReserver) -> KVReceiver:
        if self.receiver is None:
            self.receiver = make_receiver(self.transport, self.pool, self.layout, reserver)
            await self.receiver.start()
        return self.receiver

    async def close_receiver(self) -> None:
        """Ends every lease: their blocks go back to the reserver."""
        if self.receiver is not None:
            receiver, self.receiver = self.receiver, None
            await receiver.close()

    async def send(self, request_id: str, lease: LeaseDescriptor, blocks: list[int]) -> TransferStats:
        """The KV that is computed already, layer by layer (a fault point after each layer)."""
        transfer = await self.start(lease, blocks)
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

    async def start(self, lease: LeaseDescriptor, blocks: list[int]) -> Transfer:
        """A transfer of these blocks into the lease, agreed with its receiver; layers follow."""
        return await self._sender(lease.backend).start(lease, self.pool, self.layout, blocks)

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
