"""Layer-wise sending: a prefilled request's KV goes on the wire layer by layer while its last
prefill step still computes the layers after, so the transfer hides behind the prefill and
the decode side can start once the last layer landed.

LayerStreams.on_layer is the engine's layer_hook and runs on the engine's thread. On the step
that computes the last tokens of a registered request's context, it takes the request's blocks
at the first layer (allocated by then, and kept until the request is finished here) and asks
the event loop to start the transfer; each layer computed is handed to the transfer, or kept
until the transfer has started. A layer is handed on once, also when a failing step runs again
in halves. Layers of earlier chunks are not handed on: a layer is whole only in the last step.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

from mesh.engine.scheduler import ScheduledBatch
from mesh.engine.sequence import Sequence
from transport import LeaseDescriptor, Transfer, TransferError

Start = Callable[[tuple[LeaseDescriptor, ...], list[int]], Awaitable[Transfer]]


class Outgoing:
    """One request's KV on its way out while its prefill runs."""

    def __init__(self, leases: tuple[LeaseDescriptor, ...], skip_blocks: int):
        self.leases = leases  # the reservation's parts
        self.skip_blocks = skip_blocks
        self.blocks: list[int] | None = None  # set on the engine's thread at the first layer
        self.started: asyncio.Task[Transfer] | None = None  # set on the event loop right after
        self._lock = threading.Lock()
        self._seen: set[int] = set()
        self._waiting: list[int] = []  # computed before the transfer started
        self._transfer: Transfer | None = None
        self._closed = False

    def computed(self, layer: int, seq: Sequence) -> bool:
        """On the engine's thread: layer is whole. True when it is the first (start the transfer)."""
        with self._lock:
            if self._closed or layer in self._seen:
                return False
            self._seen.add(layer)
            first = self.blocks is None
            if first:
                self.blocks = list(seq.block_ids[self.skip_blocks:])
            transfer = self._transfer
            if transfer is None:
                self._waiting.append(layer)
                return first
        transfer.layer_ready(layer)
        return first

    def attach(self, transfer: Transfer) -> bool:
        """The transfer started: it gets the layers computed so far. False once closed."""
        with self._lock:
            if self._closed:
                return False
            self._transfer, waiting, self._waiting = transfer, self._waiting, []
        for layer in waiting:
            transfer.layer_ready(layer)
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed


class LayerStreams:
    def __init__(self, start: Start):
        self._start = start
        self._loop = asyncio.get_running_loop()
        self._open: dict[str, Outgoing] = {}

    def open(self, request_id: str, leases: tuple[LeaseDescriptor, ...], skip_blocks: int) -> None:
        """Before the request is added to the engine: its layers go to the lease's parts as computed."""
        self._open[request_id] = Outgoing(leases, skip_blocks)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._open

    async def transfer_of(self, request_id: str) -> tuple[Transfer, int]:
        """Once the prefill ended: the request's transfer (every layer handed to it) and its blocks."""
        out = self._open[request_id]
        if out.started is None:
            raise TransferError("plan", f"no layer of request {request_id} was computed", out.leases[0].lease_id)
        return await asyncio.shield(out.started), len(out.blocks)

    async def close(self, request_id: str) -> None:
        """The request is done here: a transfer still running stops (the receiver frees the lease)."""
        out = self._open.pop(request_id, None)
        if out is None:
            return
        out.close()
        if out.started is None:
            return
        if not out.started.done():
            out.started.cancel()
        transfer = (await asyncio.gather(out.started, return_exceptions=True))[0]
        if isinstance(transfer, Transfer):
            await transfer.abort()  # a no-op once it finished

    def on_layer(self, layer: int, batch: ScheduledBatch) -> None:
        """The engine's layer_hook (its thread)."""
        if not self._open:
            return
        for seq in [*batch.decodes, *(s for s, n in batch.prefills if n == s.num_uncomputed_tokens)]:
            out = self._open.get(seq.request_id)
            if out is not None and out.computed(layer, seq):
                self._loop.call_soon_threadsafe(self._begin, out)

    def _begin(self, out: Outgoing) -> None:
        if not out.closed:
            out.started = self._loop.create_task(self._started(out))

    async def _started(self, out: Outgoing) -> Transfer:
        transfer = await self._start(out.leases, out.blocks)
        if not out.attach(transfer):
            await transfer.abort()
            raise TransferError("lease", "the request ended before its transfer started", out.leases[0].lease_id)
        return transfer
