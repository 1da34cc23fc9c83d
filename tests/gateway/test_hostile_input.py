"""Hostile input to the gateway's front ends: bodies that used to get aiohttp's bare 500 get 400
with what to fix, internal failures reach clients without Ray's actor reprs, pids or node
addresses, long prompts are tokenized off the event loop, within a bound, and slow or idle
connections are closed and bounded in number, on both APIs."""
from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
import ray

from gateway import http_server
from gateway.config import Limits
from gateway.errors import GatewayError
from gateway.proto import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from gateway.proto import inference_pb2 as pb
from gateway.tokenizing import INLINE_CHARS, Tokenizing
from mesh.api import StreamChunk
from mesh.errors import MeshError
from tests.gateway.support import ADMIN_KEY, API_KEY, AUTH, MAX_MESSAGE_BYTES, http

NESTED = b"[" * 5000 + b"]" * 5000
HOSTILE = [  # (path, body, what the message must say), each a 500 before
    ("/v1/completions", b'{"prompt": "hi", "stream_options": ' + NESTED + b"}", "nest it less deeply"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + NESTED + b"}]}",
     "nest it less deeply"),
    ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}', "no lone \\ud800-\\udfff escapes"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udc00"}]}',
     "no lone \\ud800-\\udfff escapes"),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["\\ud800"]}', "no lone \\ud800-\\udfff escapes"),
    ("/v1/completions", b'{"prompt": "\xed\xa0\x80"}', "encode it as UTF-8"),  # a surrogate, UTF-8 encoded
    ("/v1/completions", b'{"prompt": "\xff"}', "encode it as UTF-8"),
    ("/v1/completions", b'{"prompt": "hi", "seed": 18446744073709551616}', "seed must be an integer in [0, 2**63)"),
    ("/v1/completions", b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "send smaller numbers"),
    ("/v1/completions", b'{"prompt": "hi", "stop_token_ids": [18446744073709551616]}',
     "stop_token_ids must be in [0, "),
    ("/v1/completions", b'{"prompt": "hi", "temperature": 1e999}', "temperature: Input should be a finite number"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "temperature: Input should be a finite number"),
    ("/v1/completions", b'[{"prompt": "hi"}]', "the body must be a JSON object"),
    ("/v1/completions", b'{"prompt": "hi"', "not valid JSON"),
]


@pytest.mark.parametrize("path,body,message", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies_get_400_and_what_to_fix(gateway, path, body, message):
    status, reply = http(gateway, path, body)
    assert status == 400, reply
    error = json.loads(reply)["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"], error


def test_a_body_that_cannot_be_decoded_is_400(gateway):
    request = urllib.request.Request(gateway.http_url + "/v1/completions", data=b'{"prompt": "hi"}', headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Encoding": "gzip"})  # but it is not gzip
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 400 and b"compression is broken" in info.value.read()


def test_a_key_that_is_not_utf8_is_just_a_wrong_key(gateway):
    status, reply = http(gateway, "/v1/models", key="\xff\xfe")  # sent as the bytes ff fe
    assert status == 401 and json.loads(reply)["error"]["message"] == "wrong API key"


def test_grpc_message_that_does_not_parse_is_invalid_argument(gateway):
    with grpc.insecure_channel(gateway.grpc_address) as channel:
        generate = channel.unary_stream("/pdmesh.v1.Inference/Generate", request_serializer=bytes,
                                        response_deserializer=bytes)
        for raw, message in [(b"\x0a\x02\xff\xfe", "String field had bad UTF-8"),  # text: bytes ff fe
                             (b"\x0a\x05hi", "does not parse")]:  # a string cut short
            with pytest.raises(grpc.RpcError) as info:
                list(generate(raw, metadata=AUTH, timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()


# -- internal errors ---------------------------------------------------------------------------

@ray.remote(num_cpus=0)
class Failing:
    def step(self):
        raise ValueError("the engine step failed")


@pytest.fixture
def fail(ray_cluster):
    """A coroutine that raises a real Ray error of an actor (ray::Failing.step(), pid, ip,
    actor_id and repr in its text); the texts raised in fail.texts."""
    actor = Failing.remote()

    async def fail(*args, **kwargs):
        try:
            await actor.step.remote()
        except ray.exceptions.RayTaskError as e:
            fail.texts.append(str(e))
            raise

    fail.texts = []
    yield fail
    ray.kill(actor)


def fail_dispatch(gateway, monkeypatch, fail, tokens: int = 0) -> None:
    """The scenario's dispatcher fails with the error of `fail` (a coroutine function), after
    `tokens` chunks."""
    async def generate(request, events=None):
        for i in range(tokens):
            yield StreamChunk([5], "x", None, False, None, 1, i + 1)
        await fail()

    monkeypatch.setattr(gateway.gateway.fleet.scenarios["default"].dispatcher, "generate", generate)


def _leaks(message: str, ray_text: str) -> list[str]:
    assert "pid=" in ray_text and "ip=" in ray_text and "Failing" in ray_text  # the details exist
    ip = ray_text.split("ip=", 1)[1].split(",")[0].split(")")[0]
    return [s for s in ("pid=", ip, "Failing", "actor_id", "ray::", "the engine step failed") if s in message]


def test_internal_errors_reach_clients_without_ray_details(gateway, fail, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="gateway.errors")
    fail_dispatch(gateway, monkeypatch, fail)
    status, reply = http(gateway, "/v1/completions", json.dumps(
        {"prompt": "hi", "max_tokens": 3, "request_id": "http-internal-1"}).encode())
    error = json.loads(reply)["error"]
    assert (status, error["type"]) == (500, "server_error")
    assert "http-internal-1" in error["message"] and not _leaks(error["message"], fail.texts[-1])

    with grpc.insecure_channel(gateway.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(inference_pb2_grpc.InferenceStub(channel).Generate(
                pb.GenerateRequest(text="hi", request_id="grpc-internal-1"), metadata=AUTH, timeout=30))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "grpc-internal-1" in info.value.details() and not _leaks(info.value.details(), fail.texts[-1])

        monkeypatch.setattr(gateway.gateway.fleet, "refresh", fail)  # an admin call fails the same way
        with pytest.raises(grpc.RpcError) as info:
            admin_pb2_grpc.AdminStub(channel).ListPools(admin_pb2.ListPoolsRequest(), timeout=30,
                                                        metadata=(("authorization", f"Bearer {ADMIN_KEY}"),))
        assert info.value.code() == grpc.StatusCode.INTERNAL and not _leaks(info.value.details(), fail.texts[-1])

    logged = {r.getMessage(): r for r in caplog.records}
    for rid in ("http-internal-1", "grpc-internal-1"):  # the operator still has every detail
        record = next(r for m, r in logged.items() if rid in m)
        assert "pid=" in logging.Formatter().formatException(record.exc_info)


def test_mesh_errors_reach_clients_without_node_addresses(gateway, monkeypatch):
    async def transfer_failed():
        raise MeshError("unavailable", "KV transfer failed: peer: cannot connect to 10.9.8.7:4567 (pid=4242)")

    fail_dispatch(gateway, monkeypatch, transfer_failed)
    status, reply = http(gateway, "/v1/completions", b'{"prompt": "hi", "max_tokens": 3}')
    message = json.loads(reply)["error"]["message"]
    assert status == 503 and message == "KV transfer failed: peer: cannot connect to <internal> (<internal>)"


def test_internal_error_mid_stream_ends_the_stream_without_ray_details(gateway, fail, monkeypatch):
    fail_dispatch(gateway, monkeypatch, fail, tokens=2)
    status, reply = http(gateway, "/v1/completions", json.dumps(
        {"prompt": "hi", "max_tokens": 8, "stream": True, "request_id": "sse-internal-1"}).encode())
    events = [line[len("data: "):] for line in reply.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "sse-internal-1" in error["message"]
    assert not _leaks(reply.decode(), fail.texts[-1])


# -- tokenizing --------------------------------------------------------------------------------

def test_long_prompts_tokenize_off_the_loop_while_others_are_served(gateway, monkeypatch):
    """Long prompts whose tokenizing is held (a hook in the tokenizer) fill the tokenizer threads
    and wait for one; meanwhile /health and a short prompt are answered, and an over-long
    prompt is refused without being tokenized."""
    tokenizer = gateway.gateway.fleet.scenarios["default"].tokenizer
    encode = tokenizer.encode
    started, hold, long_calls = threading.Semaphore(0), threading.Event(), []

    def held(text: str, *args, **kwargs):
        if len(text) > INLINE_CHARS:
            long_calls.append(len(text))
            started.release()
            assert hold.wait(60)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", held)
    long_prompt = ("\n" + " " * 36) * 40  # 1480 characters, 41 tokens
    body = json.dumps({"prompt": long_prompt, "max_tokens": 2}).encode()
    threads = gateway.gateway.config.gateway.tokenizer_threads
    with ThreadPoolExecutor(threads + 1) as pool:
        longs = [pool.submit(http, gateway, "/v1/completions", body) for _ in range(threads + 1)]
        try:
            for _ in range(threads):  # every tokenizer thread holds a long prompt; one more waits
                assert started.acquire(timeout=60)
            assert http(gateway, "/health", key=None) == (200, b'{"status": "ok"}')
            status, reply = http(gateway, "/v1/completions", b'{"prompt": "short", "max_tokens": 2}')
            assert status == 200 and json.loads(reply)["usage"]["completion_tokens"] == 2
            status, reply = http(gateway, "/v1/completions", json.dumps({"prompt": "x" * 10_000}).encode())
            assert status == 400 and "characters fits: shorten the prompt" in json.loads(reply)["error"]["message"]
            assert not any(f.done() for f in longs) and len(long_calls) == threads
        finally:
            hold.set()
        for f in longs:
            status, reply = f.result(60)
            assert status == 200 and json.loads(reply)["usage"]["prompt_tokens"] == 41
    assert gateway.gateway.service.tokenizing.pending == 0


class _HeldTokenizer:
    def __init__(self):
        self.hold = threading.Event()

    def encode(self, text: str) -> list[int]:
        assert len(text) <= INLINE_CHARS or self.hold.wait(60)
        return [len(text)]


def test_tokenizing_refuses_past_its_bound_and_frees_its_slots():
    async def run():
        tokenizing, tokenizer = Tokenizing(threads=1, max_pending=2), _HeldTokenizer()
        text = "x" * (INLINE_CHARS + 1)
        running = [asyncio.ensure_future(tokenizing.encode(tokenizer, text)) for _ in range(2)]
        await asyncio.sleep(0)  # both admitted: one on the thread, one waiting for it
        with pytest.raises(GatewayError, match="gateway.max_tokenizing") as info:
            await tokenizing.encode(tokenizer, text)
        assert info.value.code == "resource_exhausted" and info.value.retry_after_s
        assert await tokenizing.encode(tokenizer, "short") == [5]  # short prompts never wait
        running[1].cancel()  # a client gone while its prompt waits for a thread: the slot is freed
        await asyncio.gather(running[1], return_exceptions=True)
        assert tokenizing.pending == 1
        tokenizer.hold.set()
        assert await running[0] == [INLINE_CHARS + 1]
        assert tokenizing.pending == 0
        tokenizing.close()

    asyncio.run(run())


# -- slow and idle connections -----------------------------------------------------------------

BOUNDED = Limits(max_message_bytes=MAX_MESSAGE_BYTES, idle_timeout_s=1.0, body_timeout_s=1.0, max_connections=6)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS, H2_GOAWAY = 0x4, 0x7


def _frame_types(data: bytes) -> list[int]:
    """The types of the HTTP/2 frames in `data` (9-byte headers: length, type, flags, stream)."""
    types = []
    while len(data) >= 9:
        types.append(data[3])
        data = data[9 + int.from_bytes(data[:3], "big"):]
    return types


@dataclass
class Bounded:
    runner: object
    http_port: int
    grpc_port: int


@pytest.fixture(scope="module")
def bounded(gateway):
    """Both front ends of the test gateway's service again, on their own ports, with BOUNDED's
    short timeouts and a connection limit of 6."""
    from gateway.admin import AdminServicer
    from gateway.grpc_api import make_server
    from gateway.openai_api import OpenAIApi

    gw = gateway.gateway

    async def start():
        api = OpenAIApi(gw.service, gw.keys, gw.metrics, gw.fleet.not_ready, BOUNDED)
        runner = await http_server.start(api.app, "127.0.0.1", 0, None, BOUNDED)
        server, _ = make_server(gw.service, AdminServicer(gw.fleet, gw.control, gw.keys), gw.keys, BOUNDED)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return runner, server, port

    runner, server, grpc_port = gateway.run(start())
    yield Bounded(runner, runner.addresses[0][1], grpc_port)
    async def stop():
        await asyncio.gather(runner.cleanup(), server.stop(0))

    gateway.run(stop())


def trickle(port: int, drip: bytes, give_up_s: float = 30) -> bytes:
    """Sends `drip` a byte every 0.1 s; returns what the server sent before it closed the
    connection. Fails if it is still open after `give_up_s`."""
    with socket.create_connection(("127.0.0.1", port), timeout=give_up_s) as s:
        got, end, drip = b"", time.monotonic() + give_up_s, iter(drip)
        while time.monotonic() < end:
            if select.select([s], [], [], 0.1)[0]:
                try:
                    data = s.recv(4096)
                except ConnectionResetError:
                    return got
                if not data:
                    return got
                got += data
            elif (byte := next(drip, None)) is not None:
                try:
                    s.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    return got
    raise AssertionError(f"the server kept a trickling connection open for {give_up_s} s")


def until_closed(s: socket.socket) -> bytes:
    """What the server sends until it closes the connection (the socket's timeout bounds it)."""
    got = b""
    while data := s.recv(4096):
        got += data
    return got


def wait_for(condition, what: str) -> None:
    for _ in range(600):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def test_http_slow_loris_connections_are_closed_while_others_are_served(bounded):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"x" * 600  # a minute's worth
    with ThreadPoolExecutor(4) as pool:
        trickles = [pool.submit(trickle, bounded.http_port, head) for _ in range(4)]
        wait_for(lambda: bounded.runner.connections == 4, "4 trickling connections open")
        with urllib.request.urlopen(f"http://127.0.0.1:{bounded.http_port}/health", timeout=30) as reply:
            assert reply.status == 200
        assert [t.result() for t in trickles] == [b""] * 4  # closed by the server, no answer


def test_http_idle_keepalive_and_slow_body_are_closed(bounded):
    with socket.create_connection(("127.0.0.1", bounded.http_port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive, then nothing more
        assert until_closed(s).startswith(b"HTTP/1.1 200")
    with socket.create_connection(("127.0.0.1", bounded.http_port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() +
                  b"\r\nContent-Length: 100\r\n\r\n{\"prompt\"")  # 9 bytes of the 100
        reply = until_closed(s)
    assert reply.startswith(b"HTTP/1.1 408") and b"gateway.body_timeout_s" in reply


def test_http_connections_past_the_limit_get_503(bounded):
    idle = []
    try:
        for n in range(1, BOUNDED.max_connections + 1):
            idle.append(socket.create_connection(("127.0.0.1", bounded.http_port), timeout=30))
            wait_for(lambda: bounded.runner.connections == n, f"{n} connections open")
        with socket.create_connection(("127.0.0.1", bounded.http_port), timeout=30) as extra:
            reply = until_closed(extra)
        assert reply.startswith(b"HTTP/1.1 503") and b"gateway.max_connections" in reply
        assert [until_closed(s) for s in idle] == [b""] * len(idle)  # the idle ones time out
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: bounded.runner.connections == 0, "the idle connections gone")
    with urllib.request.urlopen(f"http://127.0.0.1:{bounded.http_port}/health", timeout=30) as reply:
        assert reply.status == 200


def test_grpc_slow_and_surplus_connections_are_closed_while_others_are_served(bounded):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with ThreadPoolExecutor(3) as pool:
        trickles = [pool.submit(trickle, bounded.grpc_port, H2_PREFACE) for _ in range(3)]
        with grpc.insecure_channel(f"127.0.0.1:{bounded.grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for t in trickles:  # the server's SETTINGS, then GOAWAY (which of its timers fired first varies)
            types = _frame_types(t.result())
            assert (types[0], types[-1]) == (H2_SETTINGS, H2_GOAWAY), types
    held = []
    try:
        for _ in range(BOUNDED.max_connections):  # each answered with the server's SETTINGS: accepted
            held.append(socket.create_connection(("127.0.0.1", bounded.grpc_port), timeout=30))
            held[-1].sendall(H2_PREFACE)
            assert held[-1].recv(9)
        with socket.create_connection(("127.0.0.1", bounded.grpc_port), timeout=30) as extra:
            assert until_closed(extra) == b""  # refused at once, without a word
    finally:
        for s in held:
            s.close()
