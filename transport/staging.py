"""One side's layers on their way between its pool and the data plane: the sender's
LayerSource and the receiver's LayerSink, for either path (path.py) and any strategy.

direct: the data plane moves the pool's own bytes (one op per run), or, where the side
moves a slice of its pool's heads, each run's slice copied into a buffer on the pool's
device (one op per run), or a gather buffer there (one op per layer). staged: the same ops, in one host buffer per
layer (pinned for an accelerator), which the copy stream fills on the sender and
empties on the receiver. Both sides agree on the ops (the plan), never on the path.

Every copy runs on the side's copy stream (stream.py), in layer order, so a layer is
staged while the layers before it are on the wire.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .copy import StagingPool, buffered_ops, gather_layer, op_views, scatter_layer, slot_index
from .memory import device_buffer, host_buffer
from .path import Path
from .plan import TransferPlan
from .stream import AcceleratorStream, CopyStream, HostStream, Work

# A transfer's steps, for tests that check their order: ("staged", layer) runs on the copy
# stream right after the layer's staging copies were issued (on the CPU: done); a hook
# that blocks there holds that layer's staging back. ("wire", layer): its ops were posted.
StepHook = Callable[[str, int], None]


class Staging:
    """One side's copy stream and reusable buffers for a pool on one device, shared by its
    transfers. Made on the event loop's thread (where UCX posts). On the CPU the stream
    (a thread) starts when a transfer first copies."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        accelerator = device.type != "cpu"
        self.host = StagingPool(lambda n: host_buffer(n, pinned=accelerator))
        self.local = StagingPool(lambda n: device_buffer(n, device)) if accelerator else self.host
        self._stream: CopyStream | None = AcceleratorStream(device) if accelerator else None

    @property
    def stream(self) -> CopyStream:
        if self._stream is None:
            self._stream = HostStream()
        return self._stream

    def mark(self) -> object | None:
        """The engine's compute so far (thread-safe; nothing to wait for on the CPU)."""
        return None if self._stream is None or self.device.type == "cpu" else self._stream.mark()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


class _Side:
    side = ""  # "src" on the sender, "dst" on the receiver

    def __init__(self, plan: TransferPlan, pool: torch.Tensor, path: Path, staging: Staging) -> None:
        self.plan, self.pool, self.path, self.staging = plan, pool, path, staging
        self._taken: list[tuple[StagingPool, torch.Tensor]] = []
        self._index: torch.Tensor | None = None
        self._issued = False  # whether any copy went on the stream

    def _issue(self, work: Work, after: object | None = None) -> object | None:
        self._issued = True
        return self.staging.stream.issue(work, after)

    def _buffer(self) -> torch.Tensor:
        """A layer's buffer: in host memory when staged, on the pool's device when direct."""
        pool = self.staging.host if self.path is Path.STAGED else self.staging.local
        buf = pool.take(self.plan.layer_bytes)
        self._taken.append((pool, buf))
        return buf

    def _slots(self) -> torch.Tensor:
        """The request's slots on this side, on the pool's device (made on the copy stream)."""
        if self._index is None:
            _, slots, _ = self.plan.side(self.side)
            self._index = slot_index(slots, self.pool.device)
        return self._index

    def _layer(self, layer: int) -> tuple[list[torch.Tensor], Work | None]:
        """What the data plane moves for a layer, and the copy between it and the pool
        (None: the data plane moves the pool's bytes themselves)."""
        if self.plan.gathers:
            buf = self._buffer()
            move = gather_layer if self.side == "src" else scatter_layer
            return [buf], lambda: move(self.plan, self.pool, layer, buf, self._slots())
        if self.path is Path.DIRECT and self.plan.whole(self.side):
            return op_views(self.plan, self.pool, layer, self.side), None
        return buffered_ops(self.plan, self.pool, layer, self.side, self._buffer())

    def drain(self) -> None:
        """Block until no copy of this transfer can still touch a buffer or the pool
        (after a failure, before either is handed on)."""
        if self._issued:
            self.staging.stream.drain()

    def release(self) -> None:
        """The buffers go back for the next transfer."""
        for pool, buf in self._taken:
            pool.give([buf])
        self._taken = []


class LayerSource(_Side):
    """The sender's half: each layer's ops, staged (or gathered) on the copy stream once
    the engine's compute for the layer is done."""

    side = "src"

    def __init__(self, plan: TransferPlan, pool: torch.Tensor, path: Path, staging: Staging,
                 on_step: StepHook | None = None) -> None:
        super().__init__(plan, pool, path, staging)
        self._on_step = on_step
        self._bufs: dict[int, list[torch.Tensor]] = {}

    def stage(self, layer: int, computed: object | None) -> object | None:
        """Start moving a layer's bytes into what the data plane sends (non-blocking);
        ``computed``: the stream mark taken when the engine said the layer was ready."""
        bufs, copy = self._layer(layer)
        self._bufs[layer] = bufs

        def work() -> None:
            if copy is not None:
                copy()
            self.step("staged", layer)
        needed = copy is not None or self._on_step is not None or computed is not None
        return self._issue(work, computed) if needed else None

    def step(self, point: str, layer: int) -> None:
        if self._on_step is not None:
            self._on_step(point, layer)

    async def ready(self, layer: int, staged: object | None) -> list[torch.Tensor]:
        """The layer's op buffers, once ``stage`` has finished with them."""
        if staged is not None:
            await self.staging.stream.wait(staged)
        return self._bufs.pop(layer)


class LayerSink(_Side):
    """The receiver's half: buffers the data plane lands each layer in, and the copies
    (or scatter) into the pool, issued as each layer lands."""

    side = "dst"

    def __init__(self, plan: TransferPlan, pool: torch.Tensor, path: Path, staging: Staging) -> None:
        super().__init__(plan, pool, path, staging)
        layers = [self._layer(layer) for layer in range(plan.dst_layout.num_layers)]
        self.buffers = [bufs for bufs, _ in layers]
        self._copies = [copy for _, copy in layers]
        self._landing: list[object] = []

    def landed(self, layer: int) -> None:
        copy = self._copies[layer]
        if copy is not None:
            self._landing.append(self._issue(copy))

    async def settled(self) -> None:
        """Every landed layer is in the pool."""
        for done in self._landing:
            await self.staging.stream.wait(done)
