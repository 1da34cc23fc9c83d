"""The small interface every backend implements, its value objects and its error.

A failure aborts one request (one lease), never the actor: every backend
raises ``TransferError`` and stays usable for the next transfer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from enum import Enum

import torch

from .layout import KVLayout
from .plan import HeadSlice, Strategy, TransferPlan, build_plan


class TransferState(str, Enum):
    BOOTSTRAPPING = "bootstrapping"  # connecting, authenticating, agreeing the plan
    WAITING = "waiting"              # ready, waiting for the engine to produce layers
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


class TransferError(Exception):
    """One transfer failed; ``code`` says why (auth, busy, wire, lease, peer, timeout,
    plan, unavailable). busy: the receiver is alive but refused the connection at one of
    its limits; the message names the limit."""

    def __init__(self, code: str, message: str, lease_id: str | None = None) -> None:
        super().__init__(f"[{code}] {message}" + (f" (lease {lease_id})" if lease_id else ""))
        self.code = code
        self.lease_id = lease_id


@dataclass(frozen=True)
class TransferStats:
    """What one transfer did, for spans and metrics."""

    backend: str
    strategy: str
    bytes: int
    ops: int
    runs: int
    layers: int
    duration_s: float
    path: str = "direct"  # direct: both sides' data planes moved the pools' own memory (path.py)

    @property
    def gbps(self) -> float:
        return self.bytes / self.duration_s / 1e9 if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "gbps": self.gbps}

    @classmethod
    def merged(cls, parts: list[TransferStats]) -> TransferStats:
        """The transfers of one request's parts (one per tensor-parallel rank and head range,
        side by side) as one: their sums, and the longest duration."""
        first = parts[0]
        strategies = sorted({p.strategy for p in parts})
        return cls(first.backend, "+".join(strategies), sum(p.bytes for p in parts),
                   sum(p.ops for p in parts), sum(p.runs for p in parts), first.layers,
                   max(p.duration_s for p in parts), first.path)


@dataclass(frozen=True)
class LeaseDescriptor:
    """What a sender needs to write into a receiver's lease (msgpack-able).

    Heads are numbered model-wide: a tensor-parallel rank's pool holds KV heads
    [first_head, first_head + layout.kv_heads), and a lease may take only some of them."""

    lease_id: str
    backend: str
    host: str
    port: int
    layout: KVLayout
    block_ids: tuple[int, ...]
    num_tokens: int
    ttl_s: float
    heads: tuple[int, int] | None = None  # the KV heads [start, stop) it takes; None: all of its pool's
    first_head: int = 0  # the receiving pool's first KV head

    @property
    def head_range(self) -> range:
        start, stop = self.heads or (self.first_head, self.first_head + self.layout.kv_heads)
        return range(start, stop)

    def dst_heads(self) -> HeadSlice:
        """The lease's heads in its pool."""
        return HeadSlice(self.head_range.start - self.first_head, len(self.head_range))

    def src_heads(self, first_head: int) -> HeadSlice:
        """The lease's heads in a sending pool whose first head is ``first_head``."""
        return HeadSlice(self.head_range.start - first_head, len(self.head_range))

    def to_wire(self) -> dict:
        return {"lease_id": self.lease_id, "backend": self.backend, "host": self.host,
                "port": self.port, "layout": self.layout.to_wire(),
                "block_ids": list(self.block_ids), "num_tokens": self.num_tokens,
                "ttl_s": self.ttl_s, "heads": list(self.heads) if self.heads else None,
                "first_head": self.first_head}

    @classmethod
    def from_wire(cls, d: dict) -> LeaseDescriptor:
        heads = d.get("heads")
        return cls(d["lease_id"], d["backend"], d["host"], int(d["port"]),
                   KVLayout.from_wire(d["layout"]), tuple(d["block_ids"]),
                   int(d["num_tokens"]), float(d["ttl_s"]),
                   (int(heads[0]), int(heads[1])) if heads else None, int(d.get("first_head", 0)))


@dataclass(frozen=True)
class ReceivedKV:
    """A committed lease: its blocks now belong to the engine."""

    lease_id: str
    block_ids: list[int]
    num_tokens: int
    stats: TransferStats


class Transfer(ABC):
    """One request's KV on its way out; the engine drives it layer by layer."""

    state: TransferState

    @abstractmethod
    def layer_ready(self, layer: int) -> None:
        """The engine has written this layer's KV: it may go on the wire now.
        Thread-safe and non-blocking, so the engine calls it between layers."""

    def all_layers_ready(self) -> None:
        for layer in range(self.num_layers):
            self.layer_ready(layer)

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @abstractmethod
    async def finish(self, timeout_s: float | None = None) -> TransferStats:
        """Wait until every layer is written and the receiver has committed."""

    @abstractmethod
    async def abort(self, reason: str = "aborted by sender") -> None:
        """Stop sending; the receiver frees the lease's blocks. ``reason`` stays on
        this side (kept in the signature for callers that log it)."""


class KVSender(ABC):
    backend: str

    @abstractmethod
    async def start(self, lease: LeaseDescriptor, pool: torch.Tensor, layout: KVLayout,
                    block_ids: list[int], strategy: Strategy | str = Strategy.CONTIGUOUS,
                    first_head: int = 0) -> Transfer:
        """Connect to the lease's receiver and agree the plan; layers follow. ``first_head``:
        the model-wide number of the pool's first KV head (a tensor-parallel rank's)."""

    async def send(self, lease: LeaseDescriptor, pool: torch.Tensor, layout: KVLayout,
                   block_ids: list[int], strategy: Strategy | str = Strategy.CONTIGUOUS,
                   timeout_s: float | None = None) -> TransferStats:
        """Move KV that is already computed: every layer at once."""
        transfer = await self.start(lease, pool, layout, block_ids, strategy)
        transfer.all_layers_ready()
        return await transfer.finish(timeout_s)

    async def close(self) -> None:
        """Release connections and buffers."""

    def _plan(self, lease: LeaseDescriptor, pool: torch.Tensor, layout: KVLayout,
              block_ids: list[int], strategy: Strategy | str, gather_threshold: int,
              first_head: int = 0) -> TransferPlan:
        """The plan from this side's blocks into the lease's; a request that cannot
        be planned fails as a TransferError, before anything is sent."""
        if lease.backend != self.backend:
            raise TransferError("plan", f"lease is for {lease.backend}, sender is {self.backend}",
                                lease.lease_id)
        try:
            layout.check_pool(pool)
            return build_plan(layout, block_ids, lease.layout, list(lease.block_ids),
                              lease.num_tokens, strategy, gather_threshold,
                              lease.src_heads(first_head), lease.dst_heads())
        except ValueError as e:
            raise TransferError("plan", str(e), lease.lease_id) from None


class KVReceiver(ABC):
    backend: str

    @abstractmethod
    def reserve(self, num_tokens: int, ttl_s: float | None = None,
                block_ids: list[int] | None = None, heads: tuple[int, int] | None = None
                ) -> LeaseDescriptor:
        """Reserve blocks for one request's KV (``block_ids``: blocks the caller allocated for
        it, else the receiver's reserver allocates); they are freed if not committed in time.
        ``heads``: the model-wide KV heads [start, stop) the lease takes (default: the pool's)."""

    @abstractmethod
    async def wait(self, lease_id: str, timeout_s: float | None = None) -> ReceivedKV:
        """Wait for the commit: the blocks then belong to the caller."""

    @abstractmethod
    def abort(self, lease_id: str) -> bool:
        """Free a lease's blocks and fail its transfer."""

    @abstractmethod
    def expire(self) -> list[str]:
        """Free every lease past its expiry (also done periodically while serving)."""

    async def start(self) -> None:
        """Begin accepting senders."""

    async def close(self) -> None:
        """Stop accepting senders, fail open transfers, free every lease."""

