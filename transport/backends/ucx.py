"""UCX data plane through ucxx: one tagged message per op into buffers the
receiver posted, so large runs move zero-copy (UCX rendezvous: CMA over shared
memory here, RDMA on RDMA NICs).

Endpoints are made from worker addresses with error handling off, which
reaches shared memory (listener endpoints force TCP); UCX then cannot report a
dead peer, so the control connection and the lease's expiry do.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import torch

from ..aio import guarded, wait_for
from ..base import TransferError
from ..channel import Channel
from ..plan import TransferPlan
from ..session import DataPlane, RecvLink, SendLink
from ..ucx_report import UcxResource, parse_context_info, unreachable

# How long closing an endpoint may wait for UCX (ns); a dead peer never answers.
_ABORT_PERIOD_NS = 100_000_000
# With rendezvous by put, cancelling a receive does not stop the sender's copy
# of a message under way; it stops once the sender sees the closed connection
# (milliseconds). Blocks of a failed transfer stay held this long to be safe.
_PUT_SETTLE_S = 1.0


def load_ucxx():
    """Import and initialise ucxx; raise TransferError('unavailable') if it cannot."""
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    # Rendezvous by put: the sender writes into the receiver's buffers. UCX aborts
    # the process whose shared-memory copy (CMA) hits a peer that just died;
    # with put that is the sender, so a dying prefill actor never takes a decode
    # actor (and every stream it serves) down with it.
    os.environ.setdefault("UCX_RNDV_SCHEME", "put_zcopy")
    try:
        import ucxx
        from ucxx import core
    except Exception as e:  # a broken wheel raises more than ImportError
        raise TransferError("unavailable", f"the ucx backend needs ucxx (ucxx-cu12): {e}") from None
    if core._ctx is None:
        # Blocking progress, driven by the event loop, moved 8192 tokens of KV at 68% of
        # a memory copy against 15% with ucxx's progress thread (measured here).
        _rearm_blocking_progress()
        ucxx.init(progress_mode=os.environ.get("UCXPY_PROGRESS_MODE", "blocking"))
    return ucxx


def _rearm_blocking_progress() -> None:
    """ucxx 0.52's blocking mode never re-arms its worker after the first event, so the
    event loop then spins on the still-readable epoll fd (a core burnt while idle: 2.5
    CPU-s in 3 s, starving the engine beside it). ucx-py re-armed in the fd callback;
    do the same."""
    from ucxx._lib_async.continuous_ucx_progress import BlockingMode

    if getattr(BlockingMode, "_pdmesh_rearms", False):
        return

    def _fd_reader_callback(self) -> None:
        self.worker.progress()
        if self.arm_task is None or self.arm_task.done():
            self.arm_task = self.event_loop.create_task(self._arm_worker())

    BlockingMode._fd_reader_callback = _fd_reader_callback
    BlockingMode._pdmesh_rearms = True


def _array(buf: torch.Tensor):
    """What ucxx posts: a CUDA tensor as itself (its __cuda_array_interface__ makes UCX
    treat it as device memory: cuda_copy / cuda_ipc / GPUDirect), host memory as numpy."""
    return buf if buf.device.type == "cuda" else buf.numpy()


def _as_transfer_error(e: BaseException, what: str) -> BaseException:
    """ucxx's own errors (a peer reset, over UCX's TCP) as the one typed error."""
    if isinstance(e, Exception) and not isinstance(e, TransferError):
        return TransferError("peer", f"UCX {what} failed: {e}")
    return e


class UcxSendLink(SendLink):
    def __init__(self, ep, tag_base: int, timeout_s: float, on_fail: Callable[[], None]) -> None:
        self._ep = ep
        self._tag_base = tag_base
        self._timeout_s = timeout_s
        self._on_fail = on_fail
        self._pending: list[asyncio.Future] = []

    async def send_layer(self, ch: Channel, layer: int, bufs: list[torch.Tensor]) -> None:
        base = self._tag_base + layer * len(bufs)
        # Not awaited here: layer i stays on the wire while layer i+1 is computed.
        self._pending.extend(
            asyncio.ensure_future(self._ep.send(_array(b), tag=base + k, force_tag=True))
            for k, b in enumerate(bufs))

    async def flush(self) -> None:
        try:
            await wait_for(asyncio.gather(*self._pending), self._timeout_s, "UCX sends")
        except BaseException as e:  # also cancelled: the receiver went away meanwhile
            self._on_fail()
            raise _as_transfer_error(e, "send")

    def close(self) -> None:
        for fut in self._pending:
            fut.cancel()


class UcxRecvLink(RecvLink):
    settle_s = _PUT_SETTLE_S

    def __init__(self, ep, tag_base: int, bufs: list[list[torch.Tensor]],
                 on_cancel: Callable[[], None]) -> None:
        self._ep = ep
        self._on_cancel = on_cancel
        self._done = False
        self._recvs = [
            [asyncio.ensure_future(ep.recv(_array(b), tag=tag_base + i * len(layer) + k,
                                           force_tag=True)) for k, b in enumerate(layer)]
            for i, layer in enumerate(bufs)]

    async def run(self, ch: Channel, plan: TransferPlan, bufs: list[list[torch.Tensor]],
                  on_layer: Callable[[int], None], timeout_s: float) -> dict:
        async def land() -> None:
            for layer, recvs in enumerate(self._recvs):
                try:
                    await asyncio.gather(*recvs)
                except BaseException as e:
                    raise _as_transfer_error(e, "receive")
                on_layer(layer)

        # Layers are handed on as they land, while the sender is still sending (or
        # computing) the rest. The commit comes once the sender posted its last send:
        # the data may still be on the wire. The sender is silent until told
        # "committed", so a closed connection meanwhile means it died (UCX itself
        # would wait forever).
        landing = asyncio.ensure_future(land())
        try:
            commit = await ch.recv("commit", timeout_s)
            await wait_for(guarded(landing, ch.until_closed()), timeout_s, "UCX receives")
        finally:
            landing.cancel()
            await asyncio.gather(landing, return_exceptions=True)  # retrieved: the first error met is raised
        self._done = True
        return commit

    def cancel(self) -> None:
        if self._done:
            return
        self._done = True
        for recvs in self._recvs:
            for fut in recvs:
                fut.cancel()
        # Closing the endpoint cancels its posted receives inside UCX (and those
        # of other transfers from the same sender, which then fail cleanly).
        self._on_cancel()
        self._ep.abort(period=_ABORT_PERIOD_NS)


class UcxPlane(DataPlane):
    name = "ucx"

    def __init__(self, timeout_s: float = 10.0) -> None:
        self._ucxx = load_ucxx()
        self._timeout_s = timeout_s
        # Endpoints by peer address, reused across transfers: made once per peer.
        self._eps: dict[bytes, object] = {}
        self._recv_eps: dict[bytes, object] = {}
        self._resources: tuple[UcxResource, ...] | None = None

    def address(self) -> bytes:
        return bytes(self._ucxx.get_worker_address())

    def reaches(self, device: str) -> str | None:
        """From the transports this process's UCX context loaded (UCX_TLS, the build, the host)."""
        if self._resources is None:
            self._resources = parse_context_info(self._ucxx.get_ucp_context_info())
        return unreachable(self._resources, device)

    async def _endpoint(self, cache: dict[bytes, object], address: bytes):
        ep = cache.get(address)
        if ep is None:
            ep = cache[address] = await self._ucxx.create_endpoint_from_worker_address(
                self._ucxx.get_ucx_address_from_buffer(address), endpoint_error_handling=False)
        return ep

    async def open_send(self, peer_address: bytes, tag_base: int) -> SendLink:
        ep = await self._endpoint(self._eps, peer_address)
        # A failed flush may mean a dead peer: make the next transfer reconnect.
        return UcxSendLink(ep, tag_base, self._timeout_s,
                           lambda: self._eps.pop(peer_address, None))

    async def open_recv(self, peer_address: bytes, tag_base: int,
                        bufs: list[list[torch.Tensor]]) -> RecvLink:
        # Receives are posted on an endpoint to the sender so that they can be cancelled.
        ep = await self._endpoint(self._recv_eps, peer_address)
        link = UcxRecvLink(ep, tag_base, bufs, lambda: self._recv_eps.pop(peer_address, None))
        await asyncio.sleep(0)  # let the receives be posted before the sender is told
        return link
