"""Same-process backend: copies straight from the sender's pool into the
receiver's, with the same plans and leases (tests, single-actor mode). Its path
is always direct: torch copies between any two devices, with no wire to stage for."""

from __future__ import annotations

import itertools
import threading
import time
import weakref

import torch

from ..base import KVSender, LeaseDescriptor, Transfer, TransferError, TransferState, TransferStats
from ..copy import StagingPool, gather_layer, op_slices, scatter_layer, slot_index
from ..layout import KVLayout
from ..plan import DEFAULT_GATHER_THRESHOLD, Strategy, TransferPlan
from ..memory import device_buffer
from ..receiver import LeasingReceiver

# Receivers of this process, by the "port" their descriptors carry.
_RECEIVERS: weakref.WeakValueDictionary[int, LocalReceiver] = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


class LocalReceiver(LeasingReceiver):
    def __init__(self, pool, layout, reserver, lease_ttl_s: float = 30.0,
                 clock=time.monotonic) -> None:
        port = next(_IDS)
        super().__init__("local", pool, layout, reserver, "local", port, lease_ttl_s, clock)
        _RECEIVERS[port] = self


class LocalTransfer(Transfer):
    def __init__(self, receiver: LocalReceiver, lease_id: str, plan: TransferPlan,
                 pool: torch.Tensor, staging: StagingPool) -> None:
        self.state = TransferState.WAITING
        self._receiver, self._lease_id, self._plan, self._pool = receiver, lease_id, plan, pool
        self._staging = staging
        self._done: set[int] = set()
        self._started = 0.0
        # held while a layer is copied (the engine's thread): stopping waits for it
        self._copying = threading.Lock()

    @property
    def num_layers(self) -> int:
        return self._plan.dst_layout.num_layers

    def _stop(self) -> None:
        with self._copying:
            self.state = TransferState.FAILED
        self._receiver.writer_done(self._lease_id)  # no copy runs now, none will start

    def layer_ready(self, layer: int) -> None:
        with self._copying:
            self._copy(layer)

    def _copy(self, layer: int) -> None:
        if self.state is TransferState.FAILED:
            return  # the lease ended: its blocks are no longer ours to write
        if not 0 <= layer < self.num_layers or layer in self._done:
            raise ValueError(f"layer {layer} is out of range or already sent")
        if not self._done:
            self.state = TransferState.TRANSFERRING
            self._started = time.perf_counter()
        plan, dst = self._plan, self._receiver.pool
        if plan.gathers:  # through a buffer on the source's device
            stage = self._staging.take(plan.layer_bytes)
            gather_layer(plan, self._pool, layer, stage, slot_index(plan.src_slots, self._pool.device))
            scatter_layer(plan, dst, layer, stage, slot_index(plan.dst_slots, dst.device))
            self._staging.give([stage])
        else:
            for s, d in zip(op_slices(plan, self._pool, layer, "src"),
                            op_slices(plan, dst, layer, "dst")):
                d.copy_(s)
        self._done.add(layer)

    async def finish(self, timeout_s: float | None = None) -> TransferStats:
        if self.state is TransferState.FAILED:
            raise TransferError("lease", "lease ended during the transfer", self._lease_id)
        if len(self._done) != self.num_layers:
            raise TransferError("plan", "finish before every layer was ready", self._lease_id)
        plan = self._plan
        stats = TransferStats("local", plan.strategy.value, plan.total_bytes,
                              plan.ops_per_layer * self.num_layers, plan.runs, self.num_layers,
                              time.perf_counter() - self._started)
        self._receiver.complete(self._lease_id, stats)
        self.state = TransferState.DONE
        return stats

    async def abort(self, reason: str = "aborted by sender") -> None:
        if self.state is not TransferState.DONE:
            self._receiver.fail(self._lease_id)
            self.state = TransferState.FAILED


class LocalSender(KVSender):
    backend = "local"

    def __init__(self, gather_threshold: int = DEFAULT_GATHER_THRESHOLD) -> None:
        self._gather_threshold = gather_threshold
        self._staging: dict[torch.device, StagingPool] = {}  # by the pool's device

    async def start(self, lease: LeaseDescriptor, pool: torch.Tensor, layout: KVLayout,
                    block_ids: list[int], strategy: Strategy | str = Strategy.CONTIGUOUS,
                    first_head: int = 0) -> Transfer:
        plan = self._plan(lease, pool, layout, block_ids, strategy, self._gather_threshold, first_head)
        receiver = _RECEIVERS.get(lease.port)
        if receiver is None:
            raise TransferError("peer", "no local receiver for this lease", lease.lease_id)
        if pool.device not in self._staging:
            self._staging[pool.device] = StagingPool(lambda n: device_buffer(n, pool.device))
        transfer = LocalTransfer(receiver, lease.lease_id, plan, pool, self._staging[pool.device])
        receiver.begin_writing(lease.lease_id, transfer._stop)
        return transfer
