"""`pdmesh bench gateway`: what one gateway process costs, with actors that answer at once
(in-process stand-ins with the actors' call shapes, so that only the gateway is measured).

- added latency: one request at a time, through gRPC and through HTTP, against the same
  request run by the dispatcher directly inside the gateway's process (p50/p99);
- routing capacity: requests/s from a load process with many concurrent gRPC calls.
"""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import click

from mesh import (ActorReport, ActorState, Committed, FeedItem, FirstToken, Lease, LoadReport, OfferReply, Outbox,
                  Role, SamplingParams, StreamChunk, percentile)

OUTPUT_TOKENS = 2  # the first token from prefill, one more from decode: every phase is crossed
progress = logging.getLogger("pdmesh.bench")  # phases, shown by `pdmesh bench` (gateway.progress)


class InstantCall:
    """A stand-in for a Ray actor method: `.remote(...)` runs fn at once (fn returns an awaitable)."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)

    def options(self, **_):
        return self


async def ready(v):
    """v as an awaitable, as a Ray object ref would give it."""
    return v


async def _refs(items):
    for item in items:
        yield ready(item)


async def _each_ready(messages):
    """An async generator's messages as a streaming Ray call gives them."""
    async for message in messages:
        yield ready(message)


def instant_lease(lease_id: str = "lease") -> Lease:
    """A lease as a decode actor grants it, for stand-ins whose prefill writes no KV."""
    from transport import KVLayout, LeaseDescriptor

    return Lease(LeaseDescriptor(lease_id, "local", "", 0, KVLayout(1, 1, 1, 1, 1), (), 0, 30.0))


def instant_commit() -> Committed:
    """A prefill's commit of a transfer that moved nothing, for stand-ins."""
    from transport import TransferStats

    return Committed(TransferStats("none", "none", 0, 0, 0, 0, 0.0), 0, 0.0)


class InstantFeed:
    """An actor's token feed and decode call as stand-ins: each decode call ends its request at
    once with one more token, its `output_tokens`-th."""

    def __init__(self, output_tokens: int):
        self.output_tokens = output_tokens
        self.outbox = Outbox()
        self.feed = InstantCall(lambda feed_id: _each_ready(self.outbox.serve(feed_id)))
        self.decode = InstantCall(self._decode)

    async def _decode(self, lease_id: str, request, feed_id: str) -> None:
        await self.outbox.opened(feed_id)
        self.outbox.put(feed_id, FeedItem(request.request_id, StreamChunk(
            [8], "b", None, True, "length", len(request.prompt_token_ids), self.output_tokens)))


class InstantActor:
    """A Ray actor handle's shape (method.remote, streaming via .options) answering at once."""

    def __init__(self, actor_id: str, role: Role):
        self.role = role
        self.report = ActorReport(actor_id, "bench", role, ActorState.SERVING, pid=0, device="none",
                                  load=LoadReport(free_blocks=1, num_blocks=1))
        self.info = InstantCall(lambda: ready(self.report))
        self.ping = InstantCall(lambda: ready(actor_id))
        self.offer = InstantCall(lambda *a: ready(OfferReply(True, "idle")))
        self.reserve = InstantCall(lambda prompt_token_ids, align_tokens=1, sender_sizes=(1,): ready(instant_lease()))
        self.renew_lease = InstantCall(lambda lease_id: ready(True))
        self.release_lease = InstantCall(lambda lease_id: ready(True))
        self.until_stopped = InstantCall(lambda: asyncio.get_running_loop().create_future())  # the supervisor's watch
        self.shutdown = InstantCall(lambda: ready(None))
        self.prefill = InstantCall(lambda request, lease: _refs([FirstToken([7], "a", None, None), instant_commit()]))
        fed = InstantFeed(OUTPUT_TOKENS)
        self.feed, self.decode = fed.feed, fed.decode


def _instant_gateway(model: Path):
    from gateway.auth import Keys
    from gateway.config import Limits, default
    from gateway.server import Gateway, Listen
    from mesh import Member

    config = default(model, mode="disaggregated", gateway=Limits(max_concurrent_requests=100_000))
    gw = Gateway(config, Keys(), Listen(grpc_port=0, http_port=0))
    for scenario in gw.fleet.scenarios.values():
        for role in (Role.PREFILL, Role.DECODE):
            actor = InstantActor(f"instant-{role.value}", role)
            scenario.pool.members[actor.report.actor_id] = Member(actor.report.actor_id, role, actor, actor.report)
    return gw


async def _direct(gw, n: int) -> list[float]:
    from mesh import Request

    dispatcher = next(iter(gw.fleet.scenarios.values())).dispatcher
    times = []
    for i in range(n):
        start = time.perf_counter()
        async for _ in dispatcher.generate(Request(f"d{i}", [1, 2, 3], SamplingParams(max_tokens=OUTPUT_TOKENS))):
            pass
        times.append(time.perf_counter() - start)
    return times


def _grpc_latency(address: str, n: int) -> list[float]:
    import grpc

    from gateway.proto import inference_pb2 as pb
    from gateway.proto import inference_pb2_grpc

    times = []
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                     sampling=pb.SamplingOptions(max_tokens=OUTPUT_TOKENS))
        for _ in range(n):
            start = time.perf_counter()
            list(stub.Generate(request, timeout=10))
            times.append(time.perf_counter() - start)
    return times


def _http_latency(url: str, n: int) -> list[float]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)  # kept alive, as clients do
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": OUTPUT_TOKENS})
    times = []
    for _ in range(n):
        start = time.perf_counter()
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        reply = connection.getresponse()
        reply.read()
        assert reply.status == 200, reply.status
        times.append(time.perf_counter() - start)
    connection.close()
    return times


def _clients(address: str, url: str, n: int, out) -> None:
    """In its own process: one request at a time over each API, after a warm-up."""
    _grpc_latency(address, 50)
    _http_latency(url, 50)
    out.put({"grpc": _grpc_latency(address, n), "http": _http_latency(url, n)})


def _in_process(target, *args):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, out))
    process.start()
    try:
        return out.get(timeout=600)
    finally:
        process.join()


def _load(address: str, concurrency: int, seconds: float, out) -> None:
    """In its own process: as many gRPC requests as `concurrency` callers finish in `seconds`."""
    import grpc
    import uvloop

    from gateway.proto import inference_pb2 as pb
    from gateway.proto import inference_pb2_grpc

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                         sampling=pb.SamplingOptions(max_tokens=OUTPUT_TOKENS))
            done = 0
            end = time.perf_counter() + seconds

            async def caller():
                nonlocal done
                while time.perf_counter() < end:
                    async for _ in stub.Generate(request, timeout=10):
                        pass
                    done += 1

            start = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            out.put(done / (time.perf_counter() - start))

    uvloop.run(main())


@contextlib.contextmanager
def served(gw) -> Iterator[asyncio.AbstractEventLoop]:
    """Starts `gw` and serves it from its own thread and event loop, as `pdmesh serve` runs;
    yields that loop (the gateway's pools live there); stops the gateway on exit."""
    import uvloop

    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(gw.start(), loop).result()
    try:
        yield loop
    finally:
        asyncio.run_coroutine_threadsafe(gw.stop(grace_s=1.0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def run(requests: int, concurrency: int, seconds: float) -> dict:
    from mesh import init_checkpoint

    progress.info("starting a gateway on stand-in actors")
    with tempfile.TemporaryDirectory() as tmp:
        gw = _instant_gateway(init_checkpoint(Path(tmp) / "tiny", "llama", "tiny", "float32"))
        with served(gw) as loop:

            def on_loop(coro):
                return asyncio.run_coroutine_threadsafe(coro, loop).result()

            try:
                address, url = gw.addresses["grpc"], gw.addresses["http"]
                progress.info(f"{requests} requests straight to the service")
                on_loop(_direct(gw, 50))  # warm-up
                direct = on_loop(_direct(gw, requests))
                # clients run in their own process: they do not share the gateway's interpreter lock
                progress.info(f"{requests} requests over gRPC, then over HTTP")
                via = _in_process(_clients, address, url, requests)
                progress.info(f"{concurrency} gRPC callers for {seconds:g} s")
                rps = _in_process(_load, address, concurrency, seconds)
            finally:
                for scenario in gw.fleet.scenarios.values():
                    scenario.pool.members.clear()  # stand-ins: nothing for Ray to stop
    result = {"requests": requests, "direct_p50_ms": percentile(direct, 50) * 1e3,
              "direct_p99_ms": percentile(direct, 99) * 1e3, "grpc_requests_per_s": rps,
              "concurrency": concurrency}
    for api, times in via.items():
        result[f"{api}_p50_ms"] = percentile(times, 50) * 1e3
        result[f"{api}_p99_ms"] = percentile(times, 99) * 1e3
        result[f"{api}_added_p50_ms"] = result[f"{api}_p50_ms"] - result["direct_p50_ms"]
        result[f"{api}_added_p99_ms"] = result[f"{api}_p99_ms"] - result["direct_p99_ms"]
    return result


@click.command("gateway")
@click.option("--requests", type=int, default=500, show_default=True, help="sequential requests per latency series")
@click.option("--concurrency", type=int, default=64, show_default=True, help="concurrent gRPC calls for requests/s")
@click.option("--seconds", type=float, default=5.0, show_default=True, help="length of the requests/s run")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def command(requests, concurrency, seconds, output):
    """Latency the gateway adds (gRPC, HTTP) and the requests/s it routes, actors answering at once."""
    result = run(requests, concurrency, seconds)
    if output == "json":
        click.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pdmesh bench gateway: {requests} sequential requests per API, then {concurrency} "
                        f"concurrent gRPC callers for {seconds:g} s; actors answer at once")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key.replace("_", " "), f"{value:.3g}" if isinstance(value, float) else str(value))
    Console().print(table)
