"""The OpenAI-compatible HTTP front end (aiohttp): /v1/completions and /v1/chat/completions,
streaming (server-sent events) or not, /v1/models, /health and /metrics.

Errors use OpenAI's body ({"error": {"message", "type", "code"}}) with the HTTP status of
their cause. A streaming response starts only once the first tokens exist, so that
admission failures (429 with Retry-After) keep their status; a failure after that ends
the stream with an error event. Nothing unexpected leaves as aiohttp's bare 500, nor with
its details: the client gets errors.hidden's message in OpenAI's error body."""
from __future__ import annotations

import asyncio
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
from gateway.openai_schema import ChatBody, CompletionBody, parse_json
from gateway.service import Chunk, GenerateCall, InferenceService

SCENARIO_HEADER = "x-pdmesh-scenario"
TIMEOUT_HEADER = "x-pdmesh-timeout-s"  # the client's deadline, as grpc-timeout is for gRPC


def error_response(e: GatewayError) -> web.Response:
    headers = {"Retry-After": str(max(1, math.ceil(e.retry_after_s)))} if e.retry_after_s else None
    return web.json_response(error_body(e), status=e.http_status, headers=headers)


def error_body(e: GatewayError) -> dict:
    return {"error": {"message": e.message, "type": e.code, "code": e.http_status, "param": None}}


class OpenAIApi:
    def __init__(self, service: InferenceService, keys: Keys, metrics: Metrics, not_ready: Callable[[], list[str]],
                 limits: Limits):
        self.service = service
        self.keys = keys
        self.metrics = metrics
        self.not_ready = not_ready
        self.body_timeout_s = limits.body_timeout_s
        self.app = web.Application(client_max_size=limits.max_message_bytes, middlewares=[self._errors_and_auth])
        self.app.add_routes([web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat_completions),
                             web.get("/v1/models", self.list_models),
                             web.get("/health", self.health), web.get("/metrics", self.metrics_text)])

    @web.middleware
    async def _errors_and_auth(self, request: web.Request, handler):
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
            return error_response(GatewayError("invalid_argument", f"{request.method} {request.path} is not "
                                                                   f"allowed; use {', '.join(e.allowed_methods)}"))
        except (web.HTTPException, ConnectionResetError):
            raise  # aiohttp's own answers, and a client gone
        except Exception as e:
            return error_response(hidden(e, uuid.uuid4().hex))

    # -- routes -------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_json(CompletionBody, await self._body(request))
        ids = tuple(body.prompt) if isinstance(body.prompt, list) else None
        call = self._call(request, body, None if ids is not None else body.prompt, ids, body.logprobs is not None)
        return await self._respond(request, body, call, "text_completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_json(ChatBody, await self._body(request))
        scenario = body.scenario or request.headers.get(SCENARIO_HEADER, "")
        prompt = self.service.chat_template(scenario, body.model).render([m.model_dump() for m in body.messages])
        call = self._call(request, body, prompt, None, body.logprobs)
        return await self._respond(request, body, call, "chat.completion")

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

    def _call(self, request: web.Request, body, text: str | None, ids: tuple[int, ...] | None,
              logprobs: bool) -> GenerateCall:
        return GenerateCall(prompt_text=text, prompt_token_ids=ids, sampling=body.sampling(logprobs),
                            scenario=body.scenario or request.headers.get(SCENARIO_HEADER, ""), model=body.model,
                            request_id=body.request_id, time_left_s=_timeout(request),
                            trace_parent=telemetry.client_context(request.headers.items()), api="http")

    async def _respond(self, request: web.Request, body, call: GenerateCall, kind: str) -> web.StreamResponse:
        stream = self.service.generate(call)
        try:
            try:
                first = await anext(stream)  # errors before any token keep their HTTP status
            except StopAsyncIteration:
                raise GatewayError("internal", "the request ended without output") from None
            shape = _Shape(kind, first, body.model or self.service.fleet.scenarios[first.scenario].served_model)
            if not body.stream:
                return web.json_response(shape.whole([first] + [chunk async for chunk in stream]))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                await _send(response, shape.opening())
                async for chunk in _chain(first, stream):
                    await _send(response, shape.delta(chunk))
                    if chunk.finish_reason and body.include_usage:
                        await _send(response, shape.usage_only(chunk))
            except GatewayError as e:
                await _send(response, error_body(e))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            await stream.aclose()  # a client gone mid-request stops the request's work and frees its KV


class _Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, kind: str, first: Chunk, model: str):
        self.kind, self.model, self.created = kind, model, int(time.time())
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + first.request_id

    def _object(self, obj: str, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def _choice(self, text: str, chunk: Chunk, delta: bool) -> dict:
        choice: dict = {"index": 0, "finish_reason": chunk.finish_reason, "logprobs": _logprobs(chunk, self.kind)}
        if self.kind == "text_completion":
            choice["text"] = text
        else:
            choice["delta" if delta else "message"] = {"content": text} if delta else {"role": "assistant",
                                                                                    "content": text}
        return choice

    def whole(self, chunks: list[Chunk]) -> dict:
        last = chunks[-1]
        merged = Chunk([t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks),
                       [lp for c in chunks for lp in (c.logprobs or [])] or None, last.finish_reason,
                       last.prompt_tokens, last.completion_tokens, last.request_id, last.scenario)
        return self._object(self.kind, [self._choice(merged.text, merged, delta=False)], _usage(last))

    def opening(self) -> dict | None:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if self.kind != "chat.completion":
            return None
        return self._object("chat.completion.chunk", [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                       "finish_reason": None, "logprobs": None}])

    def delta(self, chunk: Chunk) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return self._object(obj, [self._choice(chunk.text, chunk, delta=True)])

    def usage_only(self, chunk: Chunk) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return self._object(obj, [], _usage(chunk))


def _usage(chunk: Chunk) -> dict:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}


def _logprobs(chunk: Chunk, kind: str) -> dict | None:
    """The chosen tokens' log-probabilities (no top alternatives: the engine reports none)."""
    if not chunk.logprobs:
        return None
    if kind == "text_completion":
        return {"token_logprobs": chunk.logprobs, "tokens": [str(t) for t in chunk.token_ids]}
    return {"content": [{"token": str(t), "logprob": lp, "bytes": None, "top_logprobs": []}
                        for t, lp in zip(chunk.token_ids, chunk.logprobs)]}


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


async def _chain(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield first
    async for chunk in rest:
        yield chunk


async def _send(response: web.StreamResponse, obj: dict | None) -> None:
    if obj is not None:
        await response.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")
