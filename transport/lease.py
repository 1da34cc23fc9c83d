"""Leases: blocks a receiver reserves for one incoming request.

The receiver reserves blocks through the engine's block manager (a
``BlockReserver``), or takes blocks its owner already allocated on the thread
that owns the block manager, and hands out a descriptor; the sender writes and commits;
the receiver then hands the blocks to the engine. Abort or expiry gives them
back, so a sender that dies mid-transfer leaves nothing reserved once its
lease expires. A lease that ends while being written keeps its blocks until
its writer says it stopped: stopping a receive is not instant (a cancelled
read may still land), and no byte may land in blocks another request owns.
The clock is injected so that tests are deterministic.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

from .plan import HeadSlice


@runtime_checkable
class BlockReserver(Protocol):
    """What the engine's block manager offers the transport."""

    def allocate(self, n: int) -> list[int]:
        """n free block ids (preferring contiguous runs); raise when not enough are free.
        Not called for a lease reserved with the blocks its owner allocated."""

    def free(self, block_ids: list[int]) -> None:
        """Gives an ended lease's blocks back; it may hand them to the thread that owns
        the blocks and return at once (it is called from the event loop)."""


class LeaseError(Exception):
    """A lease is unknown, expired or in the wrong state."""


class LeaseState(str, Enum):
    RESERVED = "reserved"
    WRITING = "writing"


@dataclass
class Lease:
    lease_id: str
    block_ids: list[int]
    num_tokens: int
    expires_at: float
    state: LeaseState = LeaseState.RESERVED
    on_end: list[Callable[[str], None]] = field(default_factory=list)
    heads: HeadSlice | None = None  # the KV heads of the pool it takes (None: all)


class LeaseTable:
    def __init__(self, reserver: BlockReserver, block_size: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._reserver = reserver
        self._block_size = block_size
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        # ended while being written: blocks held until the writer stopped
        self._draining: dict[str, Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    @property
    def draining(self) -> int:
        return len(self._draining)

    def reserve(self, num_tokens: int, ttl_s: float, block_ids: list[int] | None = None) -> Lease:
        """block_ids: blocks the caller allocated for this lease (else the reserver allocates);
        from here on the lease gives them back like its own when it ends without a commit."""
        if num_tokens <= 0 or ttl_s <= 0:
            raise LeaseError("a lease needs a positive token count and time to live")
        need = -(-num_tokens // self._block_size)
        if block_ids is not None and len(block_ids) != need:
            raise LeaseError(f"{len(block_ids)} blocks given for {num_tokens} tokens: a lease needs {need}")
        blocks = self._reserver.allocate(need) if block_ids is None else block_ids
        lease = Lease(secrets.token_hex(8), list(blocks), num_tokens, self._clock() + ttl_s)
        self._leases[lease.lease_id] = lease
        return lease

    def get(self, lease_id: str) -> Lease:
        self.expire()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseError(f"lease {lease_id} is unknown, expired or already ended")
        return lease

    def start_writing(self, lease_id: str) -> Lease:
        lease = self.get(lease_id)
        if lease.state is not LeaseState.RESERVED:
            raise LeaseError(f"lease {lease_id} is already being written")
        lease.state = LeaseState.WRITING
        return lease

    def renew(self, lease_id: str, ttl_s: float) -> None:
        """Another ``ttl_s`` from now for a lease not yet being written (its sender is still
        computing the KV); a lease being written keeps the expiry its writer was told."""
        lease = self.get(lease_id)
        if lease.state is LeaseState.RESERVED:
            lease.expires_at = max(lease.expires_at, self._clock() + ttl_s)

    def remaining_s(self, lease_id: str) -> float:
        return max(0.0, self.get(lease_id).expires_at - self._clock())

    def commit(self, lease_id: str) -> list[int]:
        """The blocks now belong to the caller (the engine); the lease ends."""
        lease = self.get(lease_id)
        self._end(lease)
        return lease.block_ids

    def abort(self, lease_id: str) -> bool:
        """End a lease and free its blocks, or, while it is being written, once
        ``writer_done`` says the writer stopped. False when it had already ended."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return False
        writing = lease.state is LeaseState.WRITING
        if writing:
            self._draining[lease_id] = lease
        self._end(lease)  # the end callbacks stop the writer (and may call writer_done)
        if not writing:
            self._reserver.free(lease.block_ids)
        return True

    def writer_done(self, lease_id: str) -> None:
        """The lease's writer stopped for good: blocks of an ended lease go back."""
        lease = self._draining.pop(lease_id, None)
        if lease is not None:
            self._reserver.free(lease.block_ids)

    def expire(self) -> list[str]:
        now = self._clock()
        gone = [lid for lid, lease in self._leases.items() if lease.expires_at <= now]
        for lid in gone:
            self.abort(lid)
        return gone

    def abort_all(self) -> None:
        """At shutdown, once every writer has stopped."""
        for lid in list(self._leases):
            self.abort(lid)
        for lid in list(self._draining):
            self.writer_done(lid)

    def _end(self, lease: Lease) -> None:
        del self._leases[lease.lease_id]
        for callback in lease.on_end:
            callback(lease.lease_id)
