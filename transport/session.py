"""The control protocol shared by the networked backends (tcp, ucx).

Once per TCP control connection (kept open and reused by later transfers):
  receiver: challenge(nonce)        sender: hello(nonce, hmac)
  receiver: welcome(hmac)
The handshake has its own short deadline, and a connection in it holds no authenticated
slot (admission.py); a connection the receiver will not keep gets an error that says
why (code busy: a limit; timeout: the handshake took too long) before it is closed.
Per transfer, on an idle connection (one round trip before data, one after):
  sender:   begin(lease, layout, block ids, plan, its KV heads, its path)
  receiver: ready(tag base, data-plane address, lease time left, its path)
  ... data: layer by layer, by the data plane ...
  sender:   commit(bytes)           receiver: committed, once every byte landed (or error)
Any failure closes the connection; the sender reconnects for the next transfer.
A sender aborts by closing it too: over TCP a message could land in the middle
of a layer's bytes, so the closed connection is the only signal.
The control connection also tells the receiver that a sender died (UCX
endpoints over shared memory do not), so its lease is freed at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable

import torch

from . import wire
from .admission import Admission, ConnectionCounts, ConnectionLimits
from .aio import together, wait_for
from .base import (KVSender, LeaseDescriptor, Transfer, TransferError, TransferState,
                   TransferStats)
from .channel import Channel
from .layout import KVLayout
from .lease import BlockReserver
from .path import Path, choose, joined
from .receiver import LeasingReceiver
from .plan import DEFAULT_GATHER_THRESHOLD, HeadSlice, Strategy, TransferPlan, build_plan
from .staging import LayerSink, LayerSource, Staging, StepHook
from .wire import NONCE_BYTES, mac, verify

# The sender stops writing this long before the receiver frees the lease (one-way latency).
_LEASE_MARGIN_S = 0.1
# Authenticated idle connections a sender keeps per receiver for its next transfers.
_IDLE_PER_PEER = 4
# A receiver that cannot accept (out of file descriptors) tries again after this long.
_ACCEPT_RETRY_S = 0.1

log = logging.getLogger(__name__)


class SendLink(ABC):
    """The sending half of one transfer's data plane."""

    @abstractmethod
    async def send_layer(self, ch: Channel, layer: int, bufs: list[torch.Tensor]) -> None:
        """Put one layer's ops on the wire; may return before they land."""

    async def flush(self) -> None:
        """Wait until every op put on the wire has landed."""

    def close(self) -> None: ...


class RecvLink(ABC):
    """The receiving half of one transfer's data plane."""

    # After ``cancel``, how long bytes already on their way may still land.
    settle_s: float = 0.0

    @abstractmethod
    async def run(self, ch: Channel, plan: TransferPlan, bufs: list[list[torch.Tensor]],
                  on_layer: Callable[[int], None], timeout_s: float) -> dict:
        """Receive every layer into ``bufs`` (calling on_layer as each lands) and
        the sender's commit message, which is returned."""

    def cancel(self) -> None:
        """Stop receiving at once: no byte may land after this returns."""


class DataPlane(ABC):
    name: str

    def address(self) -> bytes:
        """What the peer needs to reach this side's data plane (empty when unused)."""
        return b""

    def reaches(self, device: str) -> str | None:
        """None when this data plane moves bytes in memory of this device type (cpu, cuda,
        npu) itself, else why not: that side's KV is then staged through host memory."""
        return None if device == "cpu" else f"the {self.name} data plane moves host memory only"

    @abstractmethod
    async def open_send(self, peer_address: bytes, tag_base: int) -> SendLink: ...

    @abstractmethod
    async def open_recv(self, peer_address: bytes, tag_base: int,
                        bufs: list[list[torch.Tensor]]) -> RecvLink:
        """Get ready to receive into ``bufs`` (one list of op buffers per layer)."""


async def _handshake_receiver(ch: Channel, secret: bytes, admit: Callable[[], None]) -> None:
    """``admit`` raises if a sender that proved the token may not stay (before welcome)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    await ch.send("challenge", nonce=nonce)
    hello = await ch.recv("hello")
    if not verify(secret, b"sender", nonce, hello["mac"]):
        raise TransferError("auth", "sender does not hold the mesh's token")
    admit()
    await ch.send("welcome", mac=mac(secret, b"receiver", hello["nonce"]))


async def _handshake_sender(ch: Channel, secret: bytes) -> None:
    challenge = await ch.recv("challenge")
    nonce = secrets.token_bytes(NONCE_BYTES)
    await ch.send("hello", nonce=nonce, mac=mac(secret, b"sender", challenge["nonce"]))
    welcome = await ch.recv("welcome")
    if not verify(secret, b"receiver", nonce, welcome["mac"]):
        raise TransferError("auth", "receiver does not hold the mesh's token")


class SocketReceiver(LeasingReceiver):
    def __init__(self, plane: DataPlane, pool: torch.Tensor, layout: KVLayout,
                 reserver: BlockReserver, secret: bytes, host: str = "127.0.0.1", port: int = 0,
                 lease_ttl_s: float = 30.0, timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, *, limits: ConnectionLimits,
                 handshake_timeout_s: float, idle_s: float = 60.0, path: Path | str = Path.AUTO
                 ) -> None:
        super().__init__(plane.name, pool, layout, reserver, host, port, lease_ttl_s, clock)
        self._plane = plane
        # Raises ValueError (a bad config) where path direct cannot be.
        self.path = choose(path, pool.device.type, plane.reaches(pool.device.type))
        self._secret = secret
        self._timeout_s = timeout_s
        self._handshake_timeout_s = handshake_timeout_s
        self._idle_s = idle_s
        self._admission = Admission(limits)
        self._keys = itertools.count()
        self._handlers: set[asyncio.Task] = set()
        self._sockets: dict[int, socket.socket] = {}  # by admission key, while served
        self._staging = Staging(pool.device)
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._listener = socket.create_server((self.host, self.port))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._tasks = [asyncio.create_task(self._accept()), asyncio.create_task(self._sweep())]

    async def close(self) -> None:
        for task in [*self._tasks, *self._handlers]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._handlers, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        self._staging.close()
        await super().close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._ttl_s / 4))
            self.leases.expire()

    def connections(self) -> ConnectionCounts:
        return self._admission.counts()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self._listener)
            except OSError as e:  # out of file descriptors: the listener stays, and so do we
                log.warning("KV receiver on port %d cannot accept: %s", self.port, e)
                await asyncio.sleep(_ACCEPT_RETRY_S)
                continue
            key = next(self._keys)
            arrival = self._admission.arrive(key, addr[0])
            if arrival.refused:
                _tell(conn, TransferError("busy", arrival.refused))
                conn.close()
                continue
            if arrival.evicted is not None:
                # Its handler sees the connection end and finishes on its own.
                evicted = self._sockets[arrival.evicted]
                _tell(evicted, TransferError("busy", arrival.evicted_why))
                _shut(evicted)
            self._sockets[key] = conn
            task = asyncio.create_task(self._serve(Channel(conn, self._timeout_s), key))
            self._handlers.add(task)
            task.add_done_callback(lambda t, key=key: self._left(t, key))

    def _left(self, task: asyncio.Task, key: int) -> None:
        self._handlers.discard(task)
        self._sockets.pop(key, None)
        self._admission.leave(key)

    def _admit(self, key: int) -> None:
        refused = self._admission.authenticate(key)
        if refused:
            raise TransferError("busy", refused)

    async def _serve(self, ch: Channel, key: int) -> None:
        try:
            await wait_for(_handshake_receiver(ch, self._secret, lambda: self._admit(key)),
                           self._handshake_timeout_s, "the handshake")
            while True:
                try:
                    begin = await ch.recv("begin", self._idle_s)
                except TransferError as e:
                    if e.code in ("timeout", "peer"):
                        return  # idle too long, or the sender left: nothing to tell
                    raise
                await self._transfer(ch, begin)
        except TransferError as e:
            await ch.try_send_error(e)
        finally:
            ch.close()

    async def _transfer(self, ch: Channel, begin: dict) -> None:
        lease_id = begin["lease_id"]
        link = sink = None
        this_task = asyncio.current_task()
        # Raises for a lease that is unknown or already being written (left alone).
        lease = self.begin_writing(lease_id, lambda: _stop(link, this_task))
        try:
            try:
                plan = build_plan(KVLayout.from_wire(begin["layout"]), begin["block_ids"],
                                  self.layout, lease.block_ids, begin["num_tokens"],
                                  begin["strategy"], begin["gather_threshold"],
                                  _heads(begin.get("src_heads")), lease.heads)
                path = joined(begin["path"], self.path)
            except (ValueError, KeyError, TypeError) as e:
                raise TransferError("plan", str(e), lease_id) from None
            if begin["num_tokens"] != self.leases.get(lease_id).num_tokens:
                raise TransferError("plan", "token count differs from the lease", lease_id)
            started = time.perf_counter()
            layers = self.layout.num_layers
            sink = LayerSink(plan, self.pool, self.path, self._staging)
            tag_base = secrets.randbits(31) << 32
            link = await self._plane.open_recv(begin["address"], tag_base, sink.buffers)
            await ch.send("ready", tag_base=tag_base, address=self._plane.address(),
                          remaining_s=float(self.leases.remaining_s(lease_id)), path=self.path.value)
            commit = await link.run(ch, plan, sink.buffers, sink.landed,
                                    self.leases.remaining_s(lease_id))
            if commit["nbytes"] != plan.total_bytes:
                raise TransferError("wire", f"sender wrote {commit['nbytes']} bytes, "
                                    f"plan has {plan.total_bytes}", lease_id)
            await sink.settled()
            self.complete(lease_id, TransferStats(
                self.backend, plan.strategy.value, plan.total_bytes,
                plan.ops_per_layer * layers, plan.runs, layers, time.perf_counter() - started,
                path.value))
            await ch.send("committed")
        except BaseException:
            _stop(link, None)
            settle_s = link.settle_s if link else 0.0
            if sink is not None:
                sink.drain()  # no copy into the pool may land once its blocks are freed
                # its buffers too are reused only once nothing can land in them
                asyncio.get_running_loop().call_later(settle_s, sink.release)
            self.fail(lease_id, settle_s)
            raise
        sink.release()


def _heads(wired: list | None) -> HeadSlice | None:
    """A begin's source heads [start, count]; none named: every head of the sender's pool."""
    return None if wired is None else HeadSlice(int(wired[0]), int(wired[1]))


def _tell(sock: socket.socket, err: TransferError) -> None:
    """Say why to a connection about to go, without waiting on it: the frame is small and
    nothing else is queued on the socket, so a send that would block is simply skipped."""
    try:
        sock.send(wire.encode("error", code=err.code, message=str(err)), socket.MSG_DONTWAIT)
    except OSError:
        pass


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the peer already went


def _stop(link: RecvLink | None, task: asyncio.Task | None) -> None:
    """Stop a transfer whose lease is ending. Its blocks stay held until its task
    has ended (``fail``): a read already under way may still land."""
    if link is not None:
        link.cancel()
    if task is not None and task is not asyncio.current_task():
        task.cancel()


class SocketTransfer(Transfer):
    def __init__(self, backend: str, ch: Channel, link: SendLink, source: LayerSource, path: Path,
                 timeout_s: float, deadline: float, reuse: Callable[[Channel], None]) -> None:
        self.state = TransferState.WAITING
        self._deadline = deadline
        self._reuse = reuse
        self._backend = backend
        self._ch, self._link, self._plan = ch, link, source.plan
        self._source, self._path = source, path
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        # (layer, the engine's compute mark when it said the layer was ready)
        self._ready: asyncio.Queue[tuple[int, object]] = asyncio.Queue(maxsize=self.num_layers)
        self._seen: set[int] = set()
        self._seen_lock = threading.Lock()
        self._started = 0.0
        self._task = asyncio.create_task(self._run())

    @property
    def num_layers(self) -> int:
        return self._plan.dst_layout.num_layers

    def layer_ready(self, layer: int) -> None:
        with self._seen_lock:
            if not 0 <= layer < self.num_layers or layer in self._seen:
                raise ValueError(f"layer {layer} is out of range or already sent")
            self._seen.add(layer)
        computed = self._source.staging.mark()
        self._loop.call_soon_threadsafe(self._ready.put_nowait, (layer, computed))

    async def _next_ready(self) -> tuple[int, object]:
        if not self._ready.empty():
            return self._ready.get_nowait()
        return await wait_for(self._ready.get(), self._timeout_s, "waiting for the engine's next layer")

    async def _run(self) -> TransferStats:
        source = self._source
        try:
            plan = self._plan
            staging: deque[tuple[int, object]] = deque()  # (layer, its staging), in the order ready
            got = 0
            for _ in range(self.num_layers):
                # Every layer ready by now starts staging at once; the oldest goes on the
                # wire as soon as it is staged, while the rest are still being copied.
                while got < self.num_layers and (not staging or not self._ready.empty()):
                    layer, computed = await self._next_ready()
                    if got == 0:
                        self.state = TransferState.TRANSFERRING
                        self._started = time.perf_counter()
                    got += 1
                    staging.append((layer, source.stage(layer, computed)))
                layer, staged = staging.popleft()
                bufs = await source.ready(layer, staged)
                if time.monotonic() > self._deadline:
                    raise TransferError("lease", "the lease expires before the KV is written")
                await self._link.send_layer(self._ch, layer, bufs)
                source.step("wire", layer)
            # Commit while UCX may still be moving bytes: the receiver answers once
            # they landed, and a receiver that died shows at once as a closed
            # connection (UCX over shared memory never reports it).
            await self._ch.send("commit", nbytes=plan.total_bytes)
            await together(self._link.flush(), self._ch.recv("committed"))
            self.state = TransferState.DONE
            self._reuse(self._ch)
            return TransferStats(self._backend, plan.strategy.value, plan.total_bytes,
                                 plan.ops_per_layer * self.num_layers, plan.runs,
                                 self.num_layers, time.perf_counter() - self._started,
                                 self._path.value)
        except BaseException:
            self.state = TransferState.FAILED
            source.drain()
            raise
        finally:
            source.release()
            self._link.close()
            if self.state is not TransferState.DONE:
                self._ch.close()

    async def finish(self, timeout_s: float | None = None) -> TransferStats:
        try:
            return await wait_for(asyncio.shield(self._task), timeout_s, "the transfer")
        except TransferError:
            await self.abort("the sender timed out")
            raise

    async def abort(self, reason: str = "aborted by sender") -> None:
        if self._task.done():
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        # Also here: a task cancelled before it first ran never reached its clean-up.
        # The closed connection tells the receiver to free the lease.
        self._link.close()
        self._ch.close()
        self.state = TransferState.FAILED


class SocketSender(KVSender):
    def __init__(self, plane: DataPlane, secret: bytes, timeout_s: float = 10.0,
                 gather_threshold: int = DEFAULT_GATHER_THRESHOLD, path: Path | str = Path.AUTO
                 ) -> None:
        self.backend = plane.name
        self._plane = plane
        self._secret = secret
        self._timeout_s = timeout_s
        self._gather_threshold = gather_threshold
        self._path = Path(path)
        # Tests observe each transfer's steps here (staging.StepHook).
        self.on_step: StepHook | None = None
        self._staging: dict[torch.device, Staging] = {}  # by the pool's device
        # Authenticated control connections between transfers, by receiver (host, port).
        self._idle: dict[tuple[str, int], list[Channel]] = {}

    async def _channel(self, host: str, port: int) -> tuple[Channel, bool]:
        """An idle connection to the receiver (True) or a new authenticated one."""
        idle = self._idle.get((host, port))
        if idle:
            return idle.pop(), True
        ch = await Channel.connect(host, port, self._timeout_s)
        try:
            await _handshake_sender(ch, self._secret)
        except BaseException:
            ch.close()
            raise
        return ch, False

    def _keep(self, host: str, port: int, ch: Channel) -> None:
        idle = self._idle.setdefault((host, port), [])
        if len(idle) < _IDLE_PER_PEER:
            idle.append(ch)
        else:
            ch.close()

    async def start(self, lease: LeaseDescriptor, pool: torch.Tensor, layout: KVLayout,
                    block_ids: list[int], strategy: Strategy | str = Strategy.CONTIGUOUS,
                    first_head: int = 0) -> Transfer:
        plan = self._plan(lease, pool, layout, block_ids, strategy, self._gather_threshold, first_head)
        try:
            path = choose(self._path, pool.device.type, self._plane.reaches(pool.device.type))
        except ValueError as e:
            raise TransferError("plan", str(e), lease.lease_id) from None
        while True:
            ch, reused = await self._channel(lease.host, lease.port)
            try:
                await ch.send("begin", lease_id=lease.lease_id, layout=layout.to_wire(),
                              block_ids=[int(b) for b in block_ids], num_tokens=lease.num_tokens,
                              strategy=Strategy(strategy).value,
                              gather_threshold=self._gather_threshold,
                              src_heads=[plan.src_heads.start, plan.src_heads.count],
                              address=self._plane.address(), path=path.value)
                ready = await ch.recv("ready")
                link = await self._plane.open_send(ready["address"], ready["tag_base"])
                break
            except TransferError as e:
                ch.close()
                if reused and e.code == "peer":
                    continue  # the receiver closed this idle connection: use a new one
                raise
            except BaseException:
                ch.close()
                raise
        # Stop writing before the receiver frees the lease (margin: one-way latency).
        deadline = time.monotonic() + ready["remaining_s"] - _LEASE_MARGIN_S
        if pool.device not in self._staging:
            self._staging[pool.device] = Staging(pool.device)
        source = LayerSource(plan, pool, path, self._staging[pool.device], self.on_step)
        return SocketTransfer(self.backend, ch, link, source, joined(path, ready["path"]),
                              self._timeout_s, deadline, lambda done: self._keep(lease.host, lease.port, done))

    async def close(self) -> None:
        for idle in self._idle.values():
            for ch in idle:
                ch.close()
        self._idle.clear()
        for staging in self._staging.values():
            staging.close()
        self._staging.clear()
