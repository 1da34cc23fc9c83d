"""Token feeds: the output of all the requests an actor serves for one gateway process, on one
Ray stream, one message per engine step.

A Ray streaming item per request per step costs each item's serialisation, an RPC and thread
wake-ups in the actor and the gateway; at a batch of 8 on a 2-core host those took ~10% of the
output tokens/s (docs/benchmarks.md). With a feed, a request's own actor call (`generate`,
`decode`) only starts it and ends when it ends: its chunks, and the MeshError that ended it if
one did, go on the feed its caller opened.

Actor side, `Outbox`: the messages queued for each open feed; `serve` yields them, all that is
queued, as one list. Gateway side, `Feeds`: one `FeedReader` per actor, opened at its first
request, hands each request its messages. One request's messages pass through one queue and
one stream, so they arrive in order and its end after its last chunk. A request's call that
fails (the actor died, the call was refused) ends its stream with that error, and a feed that
fails ends every request reading it: none waits for messages that cannot come.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator

from mesh.api import FeedItem, StreamChunk
from mesh.errors import MeshError

FEED_OPEN_S = 30.0  # how long a request's call waits for its caller's feed call to start


class Outbox:
    """Actor side: what each open feed has yet to carry."""

    def __init__(self) -> None:
        self._items: dict[str, list[FeedItem]] = {}
        self._queued: dict[str, asyncio.Event] = {}
        self._opening: dict[str, asyncio.Event] = {}

    async def serve(self, feed_id: str) -> AsyncIterator[list[FeedItem]]:
        """The feed's messages, all queued ones at a time, until the caller stops reading."""
        if feed_id in self._items:
            raise MeshError("invalid_argument", f"token feed {feed_id} is open already: open each feed once")
        self._items[feed_id] = []
        queued = self._queued[feed_id] = asyncio.Event()
        opening = self._opening.pop(feed_id, None)
        if opening is not None:
            opening.set()
        try:
            while True:
                await queued.wait()
                queued.clear()
                items, self._items[feed_id] = self._items[feed_id], []
                yield items
        finally:
            del self._items[feed_id], self._queued[feed_id]

    async def opened(self, feed_id: str, timeout_s: float = FEED_OPEN_S) -> None:
        """Returns once the feed is open: a request's call may start before its feed's."""
        if feed_id in self._items:
            return
        opening = self._opening.setdefault(feed_id, asyncio.Event())
        try:
            await asyncio.wait_for(opening.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise MeshError("unavailable", f"token feed {feed_id} was not opened within {timeout_s:.0f} s: "
                                           "a caller opens its feed (MeshActor.feed) before it sends requests") from None
        finally:
            if self._opening.get(feed_id) is opening and not opening.is_set():
                del self._opening[feed_id]

    def put(self, feed_id: str, item: FeedItem) -> None:
        items = self._items.get(feed_id)
        if items is None:  # its reader is gone: so is whoever waited for this request
            raise MeshError("cancelled", f"token feed {feed_id} closed: nobody reads request {item.request_id}")
        items.append(item)
        self._queued[feed_id].set()


class FeedReader:
    """Gateway side: reads one actor's feed and hands each request its messages."""

    def __init__(self, handle: Any):
        self.feed_id = uuid.uuid4().hex
        self._queues: dict[str, asyncio.Queue] = {}
        self.failed: BaseException | None = None
        self._stream = handle.feed.options(num_returns="streaming").remote(self.feed_id)
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for ref in self._stream:
                for item in await ref:
                    queue = self._queues.get(item.request_id)
                    if queue is not None:  # else its reader stopped early
                        queue.put_nowait(item)
            raise MeshError("unavailable", "the actor ended its token feed")
        except BaseException as e:  # the actor died, or the feed call failed: every reader hears it
            self.failed = e
            for queue in self._queues.values():
                queue.put_nowait(e)
            if isinstance(e, asyncio.CancelledError):
                raise

    def follow(self, request_id: str, call: Any) -> RequestStream:
        """The request's chunks as `call` (the actor call that serves it, sending here) makes
        them. Follows from now on, so that nothing sent before the first read is missed."""
        if request_id in self._queues:
            raise MeshError("invalid_argument", f"request id {request_id} is in flight already: "
                                                "give each request its own id")
        queue = self._queues[request_id] = asyncio.Queue()  # at most one message per step of it
        asyncio.ensure_future(call).add_done_callback(lambda ended: _call_ended(queue, ended))
        return RequestStream(self._queues, request_id, queue)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class RequestStream:
    """One request's chunks from a feed, up to its finished one. Raises the error that ended
    it, the failure of its call, or the feed's. aclose() stops following it."""

    def __init__(self, queues: dict[str, asyncio.Queue], request_id: str, queue: asyncio.Queue):
        self._queues, self._request_id, self._queue = queues, request_id, queue
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamChunk:
        while not self._done:
            item = await self._queue.get()
            if isinstance(item, FeedItem):
                if item.error is not None:
                    await self.aclose()
                    raise item.error
                self._done = item.chunk.finished
                return item.chunk
            if isinstance(item, asyncio.Future):
                if item.cancelled() or item.exception() is None:
                    continue  # it ended well: its last messages are on the feed, behind those so far
                item = item.exception()
            await self.aclose()
            raise item
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._done = True
        if self._queues.get(self._request_id) is self._queue:
            del self._queues[self._request_id]


class Feeds:
    """Gateway side: one feed per actor, opened at its first request, again after one failed."""

    def __init__(self) -> None:
        self._readers: dict[str, FeedReader] = {}

    def of(self, actor_id: str, handle: Any) -> FeedReader:
        reader = self._readers.get(actor_id)
        if reader is None or reader.failed is not None:
            for gone in [a for a, r in self._readers.items() if r.failed is not None]:
                del self._readers[gone]  # a lost actor's
            reader = self._readers[actor_id] = FeedReader(handle)
        return reader

    async def close(self) -> None:
        await asyncio.gather(*(reader.close() for reader in self._readers.values()))
        self._readers.clear()


def _call_ended(queue: asyncio.Queue, ended: asyncio.Future) -> None:
    if not ended.cancelled():
        ended.exception()  # seen here: a call that failed after its reader stopped is no news
    queue.put_nowait(ended)
