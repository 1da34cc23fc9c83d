"""Copy streams: the copies that stage or gather KV run off the engine's compute stream
and off the event loop, so that a layer is staged while another is on the wire.

One interface for every device. CUDA and torch_npu share torch's stream API
(``torch.cuda`` / ``torch.npu``: Stream, Event, stream(), current_stream()); on the
CPU one worker thread plays the stream.

Invariants: work issued on one stream runs in the order it was issued; work issued
``after`` a mark starts only once the compute that came before the mark is done
(a layer the engine has enqueued but not yet written is never read).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Work = Callable[[], None]


class CopyStream(ABC):
    device: torch.device

    @abstractmethod
    def mark(self) -> object | None:
        """The compute issued so far on the caller's current stream (the engine's layer)."""

    @abstractmethod
    def issue(self, work: Work | None, after: object | None = None) -> object | None:
        """Run ``work`` (it issues copies) on this stream, once ``after`` is done; returns what
        ``wait`` takes. None: nothing to wait for."""

    @abstractmethod
    async def wait(self, done: object | None) -> None: ...

    @abstractmethod
    def drain(self) -> None:
        """Block until every issued work ran: before buffers go back after a failure."""

    def close(self) -> None: ...


class HostStream(CopyStream):
    """The CPU's stream: one worker thread, so that copies run in order and off the event loop."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="kv-copy")

    def mark(self) -> None:
        return None  # CPU compute is done when layer_ready is called

    def issue(self, work: Work | None, after: object | None = None) -> Future | None:
        return None if work is None else self._worker.submit(work)

    async def wait(self, done: Future | None) -> None:
        if done is not None:
            await asyncio.wrap_future(done)

    def drain(self) -> None:
        self._worker.submit(lambda: None).result()

    def close(self) -> None:
        self._worker.shutdown(wait=False)


class AcceleratorStream(CopyStream):
    """A CUDA or NPU stream of its own; completion is an event."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._api = getattr(torch, device.type)  # torch.cuda, or torch.npu once torch_npu is imported
        # The event loop's thread posts UCX ops on device memory: UCX's CUDA transports use
        # the context current on that thread.
        self._api.set_device(device)
        self._stream = self._api.Stream(device)

    def mark(self):
        event = self._api.Event()
        event.record(self._api.current_stream(self.device))
        return event

    def issue(self, work: Work | None, after=None):
        if after is not None:
            self._stream.wait_event(after)
        if work is not None:
            with self._api.stream(self._stream):
                work()
        done = self._api.Event()
        done.record(self._stream)
        return done

    async def wait(self, done) -> None:
        if done is not None and not done.query():
            await asyncio.to_thread(done.synchronize)

    def drain(self) -> None:
        self._stream.synchronize()
