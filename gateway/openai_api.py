"""The OpenAI-compatible HTTP front end (aiohttp): /v1/completions and /v1/chat/completions,
streaming (server-sent events) or not, /v1/models, /health and /metrics.

Errors use OpenAI's body ({"error": {"message", "type", "param", "code"}}: `type` in OpenAI's
words, `code` the HTTP status as vLLM sends it) with the HTTP status of their cause. A
streaming response starts only once every choice's first tokens exist, so that admission
failures (429 with Retry-After) keep their status; a failure after that ends the stream with
an error event. Nothing unexpected leaves as aiohttp's bare 500, nor with its details: the
client gets errors.hidden's message in OpenAI's error body. Every response carries
X-Request-Id: the client's, or the request's own id.

`n` choices are n requests to the mesh, each streamed by its own task (see _Choices)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from typing import AsyncIterator, Callable

from aiohttp import web

from gateway import telemetry
from gateway.auth import Keys, bearer
from gateway.config import Limits
from gateway.errors import GatewayError, hidden
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.openai_response import CHAT, COMPLETION, ResponseShape
from gateway.openai_schema import ChatBody, CompletionBody, parse_json
from gateway.service import Chunk, GenerateCall, InferenceService

SCENARIO_HEADER = "x-pdmesh-scenario"
TIMEOUT_HEADER = "x-pdmesh-timeout-s"  # the client's deadline, as grpc-timeout is for gRPC
REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID = web.RequestKey("request_id", str)  # the request's own id, for X-Request-Id and the logs


def error_response(e: GatewayError, headers: dict | None = None) -> web.Response:
    headers = dict(headers or {})
    if e.retry_after_s:
        headers["Retry-After"] = str(max(1, math.ceil(e.retry_after_s)))
    return web.json_response(error_body(e), status=e.http_status, headers=headers or None)


def error_body(e: GatewayError) -> dict:
    return {"error": {"message": e.message, "type": e.openai_type, "param": e.param, "code": e.http_status}}


class OpenAIApi:
    def __init__(self, service: InferenceService, keys: Keys, metrics: Metrics, not_ready: Callable[[], list[str]],
                 limits: Limits):
        self.service = service
        self.keys = keys
        self.metrics = metrics
        self.not_ready = not_ready
        self.body_timeout_s = limits.body_timeout_s
        self.app = web.Application(client_max_size=limits.max_message_bytes, middlewares=[self._errors_and_auth])
        self.app.on_response_prepare.append(_echo_request_id)
        self.app.add_routes([web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat_completions),
                             web.get("/v1/models", self.list_models),
                             web.get("/health", self.health), web.get("/metrics", self.metrics_text)])

    @web.middleware
    async def _errors_and_auth(self, request: web.Request, handler):
        request[REQUEST_ID] = uuid.uuid4().hex  # a handler may name it otherwise (the body's request_id)
        try:
            if request.path.startswith("/v1/"):
                self.keys.check_inference(bearer(request.headers.get("Authorization")))
            return await handler(request)
        except GatewayError as e:
            return error_response(e)
        except web.HTTPRequestEntityTooLarge as e:
            return error_response(GatewayError("payload_too_large", f"the body is over the limit: {e.text}; "
                                                                    "send a shorter prompt"))
        except web.HTTPNotFound:
            return error_response(GatewayError("not_found", f"no route {request.method} {request.path}; the "
                                                            "API serves /v1/completions, /v1/chat/completions, "
                                                            "/v1/models, /health, /metrics"))
        except web.HTTPMethodNotAllowed as e:
            allowed = ", ".join(sorted(e.allowed_methods))
            return error_response(GatewayError("method_not_allowed", f"{request.method} {request.path} is not "
                                                                     f"allowed; use {allowed}"), {"Allow": allowed})
        except (web.HTTPException, ConnectionResetError):
            raise  # aiohttp's own answers, and a client gone
        except Exception as e:
            return error_response(hidden(e, request[REQUEST_ID]))

    # -- routes -------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_json(CompletionBody, await self._body(request))
        ids = tuple(body.prompt) if isinstance(body.prompt, list) else None
        call = self._call(request, body, None if ids is not None else body.prompt, ids)
        return await self._respond(request, body, call, COMPLETION)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_json(ChatBody, await self._body(request))
        scenario = body.scenario or request.headers.get(SCENARIO_HEADER, "")
        prompt = self.service.chat_template(scenario, body.model).render([m.model_dump() for m in body.messages])
        call = self._call(request, body, prompt, None)
        return await self._respond(request, body, call, CHAT)

    async def list_models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "pdmesh"} for m in self.service.models()]})

    async def health(self, request: web.Request) -> web.Response:
        problems = self.not_ready()
        if problems:
            return web.json_response({"status": "starting", "problems": problems}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.expose(), headers={"Content-Type": CONTENT_TYPE})

    # -- helpers ------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> bytes:
        """The body, within gateway.body_timeout_s: a client trickling it holds no handler longer."""
        try:
            return await asyncio.wait_for(request.read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise GatewayError("request_timeout", f"the body did not arrive within {self.body_timeout_s:g} s "
                                                  "(gateway.body_timeout_s); send it at once") from None
        except web.RequestPayloadError:
            raise GatewayError("invalid_argument", "the body cannot be read: its chunked encoding or compression is "
                                                   "broken; send it plain, gzip or deflate") from None

    def _call(self, request: web.Request, body, text: str | None, ids: tuple[int, ...] | None) -> GenerateCall:
        request[REQUEST_ID] = body.request_id or request[REQUEST_ID]
        return GenerateCall(prompt_text=text, prompt_token_ids=ids, sampling=body.sampling(),
                            scenario=body.scenario or request.headers.get(SCENARIO_HEADER, ""), model=body.model,
                            request_id=request[REQUEST_ID], time_left_s=_timeout(request),
                            trace_parent=telemetry.client_context(request.headers.items()), api="http")

    async def _respond(self, request: web.Request, body, call: GenerateCall, kind: str) -> web.StreamResponse:
        choices = _Choices([self.service.generate(c) for c in _fan_out(call, body.n)])
        try:
            events = aiter(choices)
            firsts: dict[int, Chunk] = {}
            early: list[tuple[int, Chunk]] = []
            while len(firsts) < body.n:  # errors before every choice has its first tokens keep their HTTP status
                index, chunk = await anext(events)
                firsts.setdefault(index, chunk)
                early.append((index, chunk))
            shape = self._shape(kind, body, request[REQUEST_ID], firsts[0])
            lasts = dict(firsts)
            if not body.stream:
                whole: list[list[Chunk]] = [[] for _ in range(body.n)]
                async for index, chunk in _chain(early, events):
                    whole[index].append(chunk)
                return web.json_response(shape.whole(whole))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                for opening in shape.openings(body.n):
                    await _send(response, opening)
                async for index, chunk in _chain(early, events):
                    lasts[index] = chunk
                    await _send(response, shape.delta(index, chunk))
                if body.include_usage:
                    await _send(response, shape.usage_only([lasts[i] for i in range(body.n)]))
            except GatewayError as e:
                await _send(response, error_body(e))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            await choices.close()  # a client gone mid-request stops the request's work and frees its KV

    def _shape(self, kind: str, body, request_id: str, first: Chunk) -> ResponseShape:
        scenario = self.service.fleet.scenarios[first.scenario]
        if body.return_tokens_as_token_ids:
            def token_text(token: int) -> str:
                return f"token_id:{token}"
        else:
            def token_text(token: int) -> str:
                return scenario.tokenizer.decode([token], skip_special_tokens=False)
        return ResponseShape(kind, request_id, body.model or scenario.served_model, token_text)


class _Choices:
    """A request's choices, each streamed by its own task into one bounded queue. A stream
    stays in one task from its start to its end: the request's deadline and the gateway's
    shutdown end a request by cancelling the task its stream waits in (service._until).
    Iterating yields (choice index, chunk) until every choice has finished, and raises the
    first choice's error."""

    def __init__(self, streams: list[AsyncIterator[Chunk]]):
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
        self._open = len(streams)
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]

    async def _pump(self, index: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            sent = False
            async for chunk in stream:
                sent = True
                await self._queue.put((index, chunk))
            if not sent:
                raise GatewayError("internal", "the request ended without output")
            end = None
        except GatewayError as e:
            end = e
        except Exception as e:  # the service raises GatewayErrors only; anything else must not hang the client
            end = hidden(e, uuid.uuid4().hex)
        finally:
            await stream.aclose()
        await self._queue.put((index, end))

    async def __aiter__(self) -> AsyncIterator[tuple[int, Chunk]]:
        while self._open:
            index, item = await self._queue.get()
            if isinstance(item, Chunk):
                yield index, item
            elif item is None:
                self._open -= 1
            else:
                raise item

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _fan_out(call: GenerateCall, n: int) -> list[GenerateCall]:
    """n choices as n requests; with a seed, choice i draws with seed + i (as vLLM does), so
    that the choices differ and each is reproducible."""
    if n == 1:
        return [call]
    seed = call.sampling.get("seed")
    return [dataclasses.replace(call, request_id=f"{call.request_id}-{i}",
                                sampling=call.sampling if seed is None else {**call.sampling, "seed": seed + i})
            for i in range(n)]


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[REQUEST_ID_HEADER] = request.headers.get(REQUEST_ID_HEADER) or request.get(REQUEST_ID) \
        or uuid.uuid4().hex


def _timeout(request: web.Request) -> float | None:
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise GatewayError("invalid_argument", f"{TIMEOUT_HEADER} must be a positive number of seconds, got {value!r}")
    return seconds


async def _chain(early: list, rest: AsyncIterator) -> AsyncIterator:
    for item in early:
        yield item
    async for item in rest:
        yield item


async def _send(response: web.StreamResponse, obj: dict | None) -> None:
    if obj is not None:
        await response.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")
