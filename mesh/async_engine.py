"""The engine on an asyncio loop: steps run in one worker thread, requests stream out.

Every change to the engine (add, abort, release, and the KV connector's block
reservations and frees) is queued and applied by the worker thread between steps,
so the engine and its block manager are only ever touched by one thread and the
event loop stays free to answer offers while a step computes.

While there is work, the worker thread runs step after step without waiting for the
event loop: each step's outputs are handed to the loop as they come, so a busy loop
(streaming, offers) never leaves the engine idle between steps.

A request that fails in a step (the engine isolates it) ends its own stream with
an "internal" MeshError; the others go on. Only a step that fails outside any one
request (the scheduler's bookkeeping) fails every stream. A step that fails because a
tensor-parallel rank is gone ends the loop instead: the engine cannot step any more, and
`on_broken` (the actor's) takes the whole actor down, so its requests move on elsewhere.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from mesh.api import StepSample
from mesh.engine.engine import Engine, RequestOutput
from mesh.engine.parallel import TensorParallelError
from mesh.errors import MeshError

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """Running figures the admission policy and the load reports read, and the most recent
    raw measurements (what live calibration learns from)."""
    prefill_tokens_per_s: float = 0.0  # smoothed, over steps that prefilled
    decode_step_s: float = 0.0  # smoothed, over steps that only decoded
    steps: int = 0
    samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT_SAMPLES))
    # the engine thread notes steps and the event loop transfers: a counter and a deque each
    # take one atomic call, so every sample gets a seq of its own
    _seqs: Iterator[int] = field(default_factory=itertools.count)

    def note(self, kind: str, size: int, extent: int, seconds: float) -> None:
        self.samples.append(StepSample(next(self._seqs), kind, size, extent, seconds))


RECENT_SAMPLES = 64  # kept for the reports: more than a control interval's worth at the gateway's refresh rate


class AsyncEngine:
    def __init__(self, engine: Engine, smoothing: float = 0.2,
                 thread: concurrent.futures.ThreadPoolExecutor | None = None):
        """thread: the one-thread executor that built `engine` (`build`), else a new one."""
        self.engine = engine
        self.stats = StepStats()
        self._alpha = smoothing
        self._pool = thread or _engine_thread()
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        # Called on the event loop when a rank is gone (TensorParallelError); None: streams fail.
        self.on_broken: Callable[[TensorParallelError], None] | None = None

    @classmethod
    async def build(cls, make: Callable[[], Engine]) -> AsyncEngine:
        """The engine make() builds, built on the thread that will run its steps: steps on
        another thread than the one that loaded the model ran 15-20% slower on CPU (every op
        alike, measured: torch's and OpenMP's per-thread state)."""
        thread = _engine_thread()
        try:
            engine = await asyncio.get_running_loop().run_in_executor(thread, make)
        except BaseException:
            thread.shutdown(wait=False)
            raise
        return cls(engine, thread=thread)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._task:
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=True)

    # -- requests ----------------------------------------------------------------------------
    async def call(self, fn: Callable, *args):
        """Runs fn(*args) on the engine's thread between steps and returns its result."""
        fut = self._loop.create_future()

        def run():
            try:
                result = fn(*args)
            except BaseException as e:  # handed to the awaiting caller
                self._loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                self._loop.call_soon_threadsafe(_set_result, fut, result)

        self._commands.append(run)
        self._wake.set()
        return await fut

    def post(self, fn: Callable, *args) -> None:
        """Queues fn(*args) for the engine's thread without waiting for it (a free from a
        callback that cannot wait); a failure is logged. Call it from the event loop."""
        def run():
            try:
                fn(*args)
            except Exception:  # nobody waits for it: the log says what went wrong
                log.exception("engine command %r failed", fn)

        self._commands.append(run)
        self._wake.set()

    async def stream(self, add: Callable[[], str]) -> AsyncIterator[list[RequestOutput]]:
        """Adds a request with add() (on the engine thread) and yields its outputs, one list
        per burst of steps; aborts the request if the consumer stops early."""
        queue: asyncio.Queue = asyncio.Queue()  # holds at most max_tokens outputs of one request
        try:
            request_id = await self.call(self._register_stream, add, queue)
        except asyncio.CancelledError:
            # add() is queued and still runs on the engine thread: abort what it adds, or the
            # request would run to its end for nobody, holding its KV.
            self._commands.append(lambda: self._abort_stream_of(queue))
            self._wake.set()
            raise
        finished = False
        try:
            while not finished:
                item = await queue.get()
                batch = [item]
                while not queue.empty():  # coalesce: one message per burst, not per token
                    batch.append(queue.get_nowait())
                if isinstance(batch[-1], BaseException):
                    raise batch[-1]
                failed = batch[-1].error
                if failed is not None:
                    finished = True  # the engine has ended it already
                    if batch[:-1]:
                        yield batch[:-1]
                    raise MeshError("internal", f"request {request_id} failed in the engine: {failed}")
                finished = batch[-1].finished
                yield batch
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.append(lambda: self.engine.abort(request_id))
                self._wake.set()

    def _register_stream(self, add: Callable[[], str], queue: asyncio.Queue) -> str:
        request_id = add()
        self._streams[request_id] = queue
        return request_id

    def _abort_stream_of(self, queue: asyncio.Queue) -> None:
        for request_id, q in list(self._streams.items()):
            if q is queue:
                del self._streams[request_id]
                self.engine.abort(request_id)

    # -- the loop ----------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._closed:
            if not self._commands and not self.engine.has_unfinished():
                await self._wake.wait()
                self._wake.clear()
                continue
            error = await self._loop.run_in_executor(self._pool, self._steps)
            if isinstance(error, TensorParallelError) and self.on_broken is not None:
                self.on_broken(error)
                return  # no step can run: the streams end with the actor
            if error is not None:
                self._fail_all(error)
        # What was queued before the close still happens (blocks of ended leases go back).
        await self._loop.run_in_executor(self._pool, self._apply_commands)

    def _apply_commands(self) -> None:
        while self._commands:
            self._commands.popleft()()

    def _steps(self) -> BaseException | None:
        """On the engine thread: steps until there is no work (or the engine is closed),
        handing each step's outputs to the loop; returns the error of a step that failed."""
        while not self._closed:
            self._apply_commands()
            if not self.engine.has_unfinished():
                return None
            start = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bad step fails its requests, never the actor
                log.exception("engine step failed")
                return e
            self._record(time.perf_counter() - start)
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs)
        return None

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _record(self, seconds: float) -> None:
        s = self.stats
        s.steps += 1
        last = self.engine.last_batch
        if last is None or seconds <= 0:
            return
        a = self._alpha
        if last.prefills:
            rate = last.num_tokens / seconds
            s.prefill_tokens_per_s = rate if s.prefill_tokens_per_s == 0 else (1 - a) * s.prefill_tokens_per_s + a * rate
            # a chunk of n tokens attends to everything computed up to its end (n x context)
            s.note("prefill", last.num_tokens, sum(n * seq.num_computed_tokens for seq, n in last.prefills), seconds)
        elif last.decodes:
            s.decode_step_s = seconds if s.decode_step_s == 0 else (1 - a) * s.decode_step_s + a * seconds
            s.note("decode", len(last.decodes), sum(seq.num_tokens for seq in last.decodes), seconds)

    def _fail_all(self, error: BaseException) -> None:
        for rid, queue in list(self._streams.items()):
            queue.put_nowait(MeshError("internal", f"an engine step failed outside any one request: {error!r}"))
            self._commands.append(lambda rid=rid: self.engine.abort(rid))
        self._wake.set()


def _engine_thread() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
