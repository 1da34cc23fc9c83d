"""`pdmesh bench serve`'s load: the planned requests sent to an OpenAI-compatible endpoint, each
streamed, timed and classified. Any server that speaks OpenAI's streaming API will do.

Bounds: each request ends by its timeout (`request_timeout_s`, then it counts as failed with
status "timeout"); no request is sent after `duration_s` (those count as not sent); at most
`max_concurrency` are in flight, later ones wait for a slot after their arrival time, as in
vllm bench serve. So a run ends within duration_s + request_timeout_s. No request is retried:
a 429 or 503 before the stream starts counts as a rejection, any other status (or an error
event inside the stream, or a broken connection) as a failure under its status.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import aiohttp

from gateway.bench_serve_workload import Planned

progress = logging.getLogger("pdmesh.bench")  # phases, shown by `pdmesh bench` (gateway.progress)

REJECTED = frozenset({"429", "503"})
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
ERROR_BODY_BYTES = 2048  # of a refused request's body, for its message


@dataclass(frozen=True)
class Target:
    """Where and how to send."""
    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    api_key: str | None = None
    request_timeout_s: float = 600.0
    ignore_eos: bool = False


@dataclass(frozen=True)
class Outcome:
    """What one sent request did. Times are seconds; `sent_s` is from the run's start."""
    index: int
    sent_s: float
    status: str  # "ok", an HTTP status ("429"), "timeout" or "connection"
    prompt_tokens: int  # the server's count (usage) when it gives one, else the planned length
    output_tokens: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: tuple[float, ...] = ()  # gaps between successive chunks with text
    message: str = ""

    @property
    def completed(self) -> bool:
        return self.status == "ok"

    @property
    def rejected(self) -> bool:
        return self.status in REJECTED

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT); None with fewer than two."""
        if not self.completed or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class LoadResult:
    outcomes: tuple[Outcome, ...]
    planned: int
    duration_s: float  # from the first send to the last answer


async def run(target: Target, planned: list[Planned], max_concurrency: int | None = None,
              duration_s: float | None = None, num_warmups: int = 0) -> LoadResult:
    """Sends `planned` (in arrival order) and waits for every answer."""
    if target.endpoint not in ENDPOINTS:
        raise ValueError(f"--endpoint {target.endpoint}: choose {' or '.join(ENDPOINTS)}")
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=target.request_timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        if num_warmups:
            progress.info(f"{num_warmups} warm-up requests to {target.base_url}")
        for warm in planned[:num_warmups]:  # not timed, not counted
            await _send(session, target, warm, time.perf_counter())
        start = time.perf_counter()
        tasks = []
        phase, answered = f"requests to {target.base_url}", 0
        progress.info(phase, extra={"done": 0, "total": len(planned)})

        def one_answered(_) -> None:
            nonlocal answered
            answered += 1
            progress.info(phase, extra={"done": answered, "total": len(planned)})

        for request in planned:
            if duration_s is not None and request.at_s >= duration_s:
                break
            await asyncio.sleep(max(0.0, start + request.at_s - time.perf_counter()))
            if slots and not await _slot(slots, start, duration_s):
                break
            tasks.append(asyncio.create_task(_one(session, target, request, start, slots)))
            tasks[-1].add_done_callback(one_answered)
        outcomes = await asyncio.gather(*tasks)
    return LoadResult(tuple(outcomes), len(planned), time.perf_counter() - start)


async def _slot(slots: asyncio.Semaphore, start: float, duration_s: float | None) -> bool:
    """A free slot, or False when the run's duration ends first."""
    if duration_s is None:
        await slots.acquire()
        return True
    try:
        await asyncio.wait_for(slots.acquire(), max(0.0, start + duration_s - time.perf_counter()))
        return True
    except asyncio.TimeoutError:
        return False


async def _one(session, target: Target, request: Planned, start: float, slots) -> Outcome:
    try:
        return await _send(session, target, request, start)
    finally:
        if slots:
            slots.release()


def _body(target: Target, request: Planned) -> dict:
    body = {"model": target.model, "max_tokens": request.output_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.0}
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": request.prompt_text}]
    else:
        body["prompt"] = list(request.prompt_ids)
    return body


async def _send(session: aiohttp.ClientSession, target: Target, request: Planned, start: float) -> Outcome:
    sent = time.perf_counter()
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    stream = _Stream(request, sent - start)
    try:
        async with session.post(target.base_url.rstrip("/") + target.endpoint, json=_body(target, request),
                                headers=headers) as response:
            if response.status != 200:
                text = (await response.content.read(ERROR_BODY_BYTES)).decode(errors="replace")
                return stream.failed(str(response.status), _message(text))
            async for line in response.content:
                if stream.line(line, time.perf_counter() - sent):
                    break
    except asyncio.TimeoutError:
        return stream.failed("timeout", f"no complete answer within {target.request_timeout_s:g} s")
    except aiohttp.ClientError as e:
        return stream.failed("connection", f"{type(e).__name__}: {e}")
    except ValueError as e:  # an event that is not JSON
        return stream.failed("bad_stream", f"an event that is not JSON: {e}")
    return stream.outcome()


class _Stream:
    """One response's server-sent events, read as they come."""

    def __init__(self, request: Planned, sent_s: float):
        self.request, self.sent_s = request, sent_s
        self.times: list[float] = []  # of each chunk with text, from sending
        self.usage: dict | None = None
        self.error: tuple[str, str] | None = None
        self.done_s: float | None = None

    def line(self, raw: bytes, at_s: float) -> bool:
        """Takes one line; True at the end of the stream."""
        line = raw.strip()
        if not line.startswith(b"data:"):
            return False
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done_s = at_s
            return True
        event = json.loads(data)
        if "error" in event:
            error = event["error"] or {}
            self.error = (str(error.get("code") or "stream_error"), str(error.get("message", "")))
            return False
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                self.times.append(at_s)
        return False

    def failed(self, status: str, message: str) -> Outcome:
        return Outcome(self.request.index, self.sent_s, status, len(self.request.prompt_ids), len(self.times),
                       message=message)

    def outcome(self) -> Outcome:
        if self.error:
            return self.failed(*self.error)
        if self.done_s is None:
            return self.failed("connection", "the stream ended without [DONE]")
        if not self.times:
            return self.failed("no_output", "the stream had no text")
        usage = self.usage or {}
        return Outcome(self.request.index, self.sent_s, "ok",
                       int(usage.get("prompt_tokens") or len(self.request.prompt_ids)),
                       int(usage.get("completion_tokens") or len(self.times)), self.times[0], self.done_s,
                       tuple(b - a for a, b in zip(self.times, self.times[1:])))


def _message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text.strip()[:300]
