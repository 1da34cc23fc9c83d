"""The receiving half every backend shares: leases, waiters for commits, and
stopping a transfer before its lease's blocks go back to the engine."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import torch

from .aio import wait_for
from .base import KVReceiver, LeaseDescriptor, ReceivedKV, TransferError, TransferStats
from .layout import KVLayout
from .lease import BlockReserver, Lease, LeaseError, LeaseTable

# Outcomes of ended leases kept for a late ``wait`` (the commit may land before the
# engine asks); past this many, the oldest go, so unclaimed leases cannot pile up.
_KEEP_ENDED = 1024


class LeasingReceiver(KVReceiver):
    def __init__(self, backend: str, pool: torch.Tensor, layout: KVLayout,
                 reserver: BlockReserver, host: str, port: int, lease_ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        layout.check_pool(pool)
        self.backend = backend
        self.pool = pool
        self.layout = layout
        self.host, self.port = host, port
        self._ttl_s = lease_ttl_s
        self.first_head = 0  # the model-wide number of the pool's first KV head (a tensor-parallel rank's)
        self.leases = LeaseTable(reserver, layout.block_size, clock)
        self._waiters: dict[str, asyncio.Future] = {}
        self._ended_ids: deque[str] = deque()
        # lease id -> what stops its transfer (called before its blocks are freed)
        self._stoppers: dict[str, Callable[[], None]] = {}

    def reserve(self, num_tokens: int, ttl_s: float | None = None,
                block_ids: list[int] | None = None, heads: tuple[int, int] | None = None
                ) -> LeaseDescriptor:
        ttl_s = ttl_s or self._ttl_s
        own = range(self.first_head, self.first_head + self.layout.kv_heads)
        if heads is not None and not (heads[0] < heads[1] and heads[0] in own and heads[1] - 1 in own):
            raise LeaseError(f"KV heads {heads[0]}..{heads[1] - 1} are not among this pool's {own.start}..{own.stop - 1}")
        lease = self.leases.reserve(num_tokens, ttl_s, block_ids)
        self._waiters[lease.lease_id] = asyncio.get_running_loop().create_future()
        lease.on_end.append(self._ended)
        desc = LeaseDescriptor(lease.lease_id, self.backend, self.host, self.port, self.layout,
                               tuple(lease.block_ids), num_tokens, ttl_s, heads, self.first_head)
        lease.heads = desc.dst_heads()
        return desc

    async def wait(self, lease_id: str, timeout_s: float | None = None) -> ReceivedKV:
        fut = self._waiters.get(lease_id)
        if fut is None:
            raise TransferError("lease", "unknown lease", lease_id)
        try:
            return await wait_for(asyncio.shield(fut), timeout_s, "waiting for the commit",
                                  lease_id)
        finally:
            if fut.done():
                self._waiters.pop(lease_id, None)

    def renew(self, lease_id: str) -> bool:
        """Another time to live for a lease whose KV is still being computed; False once it ended."""
        try:
            self.leases.renew(lease_id, self._ttl_s)
        except LeaseError:
            return False
        return True

    def abort(self, lease_id: str) -> bool:
        return self.leases.abort(lease_id)

    def expire(self) -> list[str]:
        return self.leases.expire()

    async def close(self) -> None:
        self.leases.abort_all()

    def begin_writing(self, lease_id: str, stop: Callable[[], None]) -> Lease:
        """A sender starts writing: the lease (its blocks and heads), and how to stop it if it
        ends. The writer calls ``writer_done`` (or ``fail``) once it can write no more."""
        try:
            lease = self.leases.start_writing(lease_id)
        except LeaseError as e:
            raise TransferError("lease", str(e), lease_id) from None
        self._stoppers[lease_id] = stop
        return lease

    def complete(self, lease_id: str, stats: TransferStats) -> None:
        """Every byte landed: the blocks go to whoever waits for the lease."""
        if self._stoppers.pop(lease_id, None) is None:
            raise TransferError("lease", "lease ended during the transfer", lease_id)
        lease = self.leases.get(lease_id)
        self._waiters[lease_id].set_result(
            ReceivedKV(lease_id, lease.block_ids, lease.num_tokens, stats))
        self.leases.commit(lease_id)

    def fail(self, lease_id: str, settle_s: float = 0.0) -> None:
        """A transfer failed and its writer stopped: end the lease, and free its
        blocks once bytes already on their way cannot land any more."""
        self._stoppers.pop(lease_id, None)
        self.leases.abort(lease_id)
        if settle_s > 0:
            asyncio.get_running_loop().call_later(settle_s, self.writer_done, lease_id)
        else:
            self.writer_done(lease_id)

    def writer_done(self, lease_id: str) -> None:
        self.leases.writer_done(lease_id)

    def _ended(self, lease_id: str) -> None:
        stop = self._stoppers.pop(lease_id, None)
        if stop is not None:
            stop()
        fut = self._waiters.get(lease_id)
        if fut is not None and not fut.done():
            fut.set_exception(TransferError("lease", "lease ended without a commit", lease_id))
            fut.exception()  # retrieved here: nobody may be waiting
        self._ended_ids.append(lease_id)
        while len(self._ended_ids) > _KEEP_ENDED:
            self._waiters.pop(self._ended_ids.popleft(), None)
