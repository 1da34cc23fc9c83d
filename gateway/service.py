"""One request's way through the gateway, whichever API it came by: check and tokenize the
prompt, classify it to a scenario, bound it (in-flight limit, deadlines), run it across the
scenario's pool, and measure it (span, metrics). The gRPC and HTTP front ends only
translate their formats to a GenerateCall and the Chunks back.

Every failure leaves as a GatewayError; those of the gateway's own code or the mesh's internals
(a Ray error names actors, pids and node addresses) as errors.hidden's, which keeps the details
in the log under the request id."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from opentelemetry import trace

from gateway import telemetry
from gateway.chat import ChatTemplate
from gateway.config import Limits
from gateway.errors import GatewayError, hidden
from gateway.fleet import Fleet, Scenario
from gateway.metrics import Metrics
from gateway.observe import LoadWindow
from gateway.router import Deadlines, InFlightLimit, RequestFacts, ScenarioRouter
from gateway.tokenizing import Tokenizing, max_prompt_chars
from mesh import MeshError, Request, RequestError, SamplingParams, StreamChunk, tracing


@dataclass(frozen=True)
class GenerateCall:
    prompt_text: str | None = None  # exactly one of text and token ids
    prompt_token_ids: tuple[int, ...] | None = None
    sampling: dict = field(default_factory=dict)  # the SamplingParams fields the client set
    scenario: str = ""  # explicit tag
    model: str = ""
    request_id: str = ""
    time_left_s: float | None = None  # until the client's own deadline
    trace_parent: object | None = None  # the OpenTelemetry context the client sent
    api: str = "grpc"


@dataclass(frozen=True)
class Chunk:
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str | None  # set on the last chunk: "stop" or "length"
    prompt_tokens: int
    completion_tokens: int  # so far
    request_id: str
    scenario: str
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: the most likely (id, logprob)


@dataclass(frozen=True)
class _Prepared:
    scenario: Scenario
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class InferenceService:
    def __init__(self, fleet: Fleet, limits: Limits, metrics: Metrics, clock: Callable[[], float] = time.monotonic):
        self.fleet = fleet
        self.limits = limits
        self.metrics = metrics
        # every admitted request's figures, for the ratio controller (gateway.control)
        self.load = LoadWindow({name: s.spec.slo for name, s in fleet.scenarios.items()}, clock)
        self.clock = clock
        self.router = ScenarioRouter([s.spec for s in fleet.scenarios.values()],
                                     {name: s.served_model for name, s in fleet.scenarios.items()})
        self.deadlines = Deadlines(limits.admission_timeout_s, limits.request_timeout_s)
        self.in_flight = InFlightLimit(limits.max_concurrent_requests)
        models = {s.spec.model: s.tokenizer for s in fleet.scenarios.values()}
        self._tokenizer = next(iter(models.values())) if len(models) == 1 else None
        self.tokenizing = Tokenizing(limits.tokenizer_threads, limits.max_tokenizing)
        # checked before any tokenizing: past these, no served model's context can hold the prompt
        self._max_prompt_tokens = max(s.max_model_len for s in fleet.scenarios.values())
        self._max_prompt_chars = max(max_prompt_chars(s.tokenizer, s.max_model_len)
                                     for s in fleet.scenarios.values())
        self.closing = False  # set on shutdown: new requests are refused, those in flight go on
        self._streaming: dict[Callable[[GatewayError], None], asyncio.Task] = {}  # each request's end, its task

    async def finish(self, grace_s: float) -> None:
        """Shutdown: new requests are refused; those streaming get `grace_s` to finish, then
        end UNAVAILABLE (their streams are closed, which stops the actors' work)."""
        self.closing = True
        if self._streaming:
            await asyncio.wait(set(self._streaming.values()), timeout=grace_s)
        left = GatewayError("unavailable", f"the gateway shut down before the request finished (its grace period of "
                                           f"{grace_s:g} s ran out); retry on another gateway")
        for end in list(self._streaming):
            end(left)

    def models(self) -> list[str]:
        return self.router.models()

    def chat_template(self, scenario: str, model: str) -> ChatTemplate:
        """The template of the checkpoint the request names (by scenario or model name); chat
        prompts are rendered before classification, which may count their tokens."""
        by_name = self.fleet.scenarios.get(scenario) or self.fleet.scenarios.get(model)
        if by_name is not None:
            return by_name.chat
        served = [s for s in self.fleet.scenarios.values() if not model or s.served_model == model]
        if not served:
            self.router.route(RequestFacts(0, "", scenario, model))  # raises the not-found error that fits
        if len({s.spec.model for s in served}) > 1 and not model:
            raise GatewayError("invalid_argument", f"this gateway serves several models: name one in 'model' "
                                                   f"({', '.join(self.models())})")
        return served[0].chat

    async def generate(self, call: GenerateCall) -> AsyncIterator[Chunk]:
        """Yields the output in bursts; raises GatewayError, before the first chunk for anything
        the client can fix or retry (bad input, no capacity), with what to do in the message."""
        start = self.clock()
        tracer = trace.get_tracer("pdmesh")
        span = tracer.start_span("gateway.generate", context=call.trace_parent, kind=trace.SpanKind.SERVER,
                                 attributes={"pdmesh.api": call.api})
        label, outcome, first_at, n = "", "internal", None, 0
        acquired, tpot_s, events = False, None, ()
        request_id = call.request_id or uuid.uuid4().hex
        try:
            with trace.use_span(span, end_on_exit=False):
                with tracer.start_as_current_span("classify") as classify_span:
                    prep = await self._prepare(call, request_id)
                    classify_span.set_attribute("pdmesh.scenario", prep.scenario.name)
            label = prep.scenario.name
            if self.closing:
                raise GatewayError("unavailable", "the gateway is shutting down; retry on another gateway")
            span.set_attributes({"pdmesh.request_id": prep.request_id, "pdmesh.scenario": label,
                                 "pdmesh.prompt_tokens": len(prep.prompt_token_ids)})
            self.in_flight.acquire()
            acquired = True
            self.metrics.admitted(label, len(prep.prompt_token_ids))
            self.load.arrived(label, len(prep.prompt_token_ids))
            events = telemetry.SpanEvents(span)
            end = self.deadlines.end(start, call.time_left_s)
            request = Request(prep.request_id, prep.prompt_token_ids, prep.params, deadline=end,
                              admission_deadline=self.deadlines.admission(start, call.time_left_s),
                              ttft_budget_s=prep.scenario.spec.slo.ttft_s, tpot_s=prep.scenario.spec.slo.tpot_s,
                              trace_context=tracing.carrier_of(span))
            try:
                async for chunk in _until(prep.scenario.dispatcher.generate(request, events), end, self.clock,
                                          self._streaming):
                    now = self.clock()
                    if first_at is None:
                        first_at = now
                        self.metrics.first_token(label, now - start)
                    n = chunk.num_output_tokens
                    yield Chunk(chunk.token_ids, chunk.text, chunk.logprobs, chunk.finish_reason,
                                len(prep.prompt_token_ids), n, prep.request_id, label, chunk.top_logprobs)
                    outcome = chunk.finish_reason or outcome
            finally:
                self.metrics.record_events(label, events)
            if n > 1:
                tpot_s = (self.clock() - first_at) / (n - 1)
            span.set_attribute("pdmesh.output_tokens", n)
        except MeshError as e:
            outcome = e.code
            err = GatewayError.from_mesh(e) if e.code != "internal" else hidden(e, request_id)
            tracing.end(span, e)  # the operator's trace keeps the whole text
            raise err from None
        except GatewayError as e:
            outcome = e.code
            tracing.end(span, e)
            raise
        except (asyncio.CancelledError, GeneratorExit) as e:  # the client went away: its work is stopped
            outcome = "cancelled"
            tracing.end(span, e)
            raise
        except Exception as e:
            tracing.end(span, e)
            raise hidden(e, request_id) from None
        except BaseException as e:
            tracing.end(span, e)
            raise
        else:
            tracing.end(span)
        finally:
            if acquired:
                self.in_flight.release()
                self.metrics.streamed(label, n, tpot_s)
                self.metrics.left(label)
                if outcome != "cancelled":  # a client that left says nothing about the mesh's SLOs
                    self.load.ended(label, None if first_at is None else first_at - start, tpot_s, n,
                                    any(e.name == "decode_rejected" for e in events))
            if label:
                self.metrics.ended(label, outcome, self.clock() - start)

    async def _prepare(self, call: GenerateCall, request_id: str) -> _Prepared:
        if call.prompt_token_ids is not None:
            ids = list(call.prompt_token_ids)
            text = ""
        else:
            text = call.prompt_text or ""
            ids = None
        if not (ids or text):
            raise GatewayError("invalid_argument", "the prompt is empty: send prompt text or token ids")
        self._check_size(text, ids)
        if ids is None:
            # Rules may count prompt tokens before the scenario (and so its tokenizer) is known:
            # exact when every scenario shares one model, else estimated at 4 bytes a token.
            guess = await self.tokenizing.encode(self._tokenizer, text) if self._tokenizer else None
            count = len(guess) if guess is not None else len(text.encode()) // 4
            scenario = self.fleet.scenarios[self.router.route(RequestFacts(
                count, text, call.scenario, call.model, tuple(guess or ())))]
            ids = guess if guess is not None else await self.tokenizing.encode(scenario.tokenizer, text)
        else:
            scenario = self.fleet.scenarios[self.router.route(RequestFacts(
                len(ids), "", call.scenario, call.model, tuple(ids)))]
            vocab = scenario.tokenizer.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise GatewayError("invalid_argument", f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
        room = scenario.max_model_len - len(ids)
        if room < 1:
            raise GatewayError("invalid_argument", f"the prompt has {len(ids)} tokens; the model's context is "
                                                   f"{scenario.max_model_len} tokens: shorten the prompt")
        sampling = dict(call.sampling)
        if sampling.get("max_tokens") is None:
            sampling["max_tokens"] = min(self.limits.default_max_tokens, room)
        try:
            params = SamplingParams(**sampling)
        except TypeError as e:
            raise GatewayError("invalid_argument", f"unknown sampling option: {e}") from None
        except RequestError as e:
            raise GatewayError("invalid_argument", str(e)) from None
        vocab = scenario.tokenizer.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise GatewayError("invalid_argument", f"stop_token_ids must be in [0, {vocab}); got {bad[:5]}")
        if params.max_tokens > room:
            raise GatewayError("invalid_argument", f"the prompt has {len(ids)} tokens and max_tokens is "
                                                   f"{params.max_tokens}; the model's context is "
                                                   f"{scenario.max_model_len}: lower max_tokens to {room} or less")
        return _Prepared(scenario, request_id, ids, params)

    def _check_size(self, text: str, ids: list[int] | None) -> None:
        """Refuses, before tokenizing, a prompt that no served model's context can hold."""
        if ids is not None and len(ids) >= self._max_prompt_tokens:
            raise GatewayError("invalid_argument", f"the prompt has {len(ids)} tokens; the model's context is "
                                                   f"{self._max_prompt_tokens} tokens: shorten the prompt")
        if len(text) > self._max_prompt_chars:
            raise GatewayError("invalid_argument", f"the prompt has {len(text)} characters; the model's context is "
                                                   f"{self._max_prompt_tokens} tokens, which no prompt over "
                                                   f"{self._max_prompt_chars} characters fits: shorten the prompt")


async def _until(stream: AsyncIterator[StreamChunk], deadline: float, clock: Callable[[], float],
                 streaming: dict | None = None) -> AsyncIterator[StreamChunk]:
    """The stream's chunks until the request's deadline; past it, DEADLINE_EXCEEDED (the
    stream is closed, which stops the actors' work and frees its KV). While it runs, its
    `end(error)` is in `streaming` (with the task it runs in), for a shutdown to end it early.

    One timer per request rather than asyncio.wait_for per chunk (a task and a timer each):
    the timer cancels the request's task only while it waits for the next chunk, never while
    the caller writes a chunk out (a cancellation there would land in the caller's code)."""
    task = asyncio.current_task()
    waiting = False
    ended: GatewayError | None = None

    def end(error: GatewayError) -> None:
        nonlocal ended
        ended = ended or error
        if waiting:
            task.cancel()

    timer = asyncio.get_running_loop().call_later(max(0.0, deadline - clock()), end, GatewayError(
        "deadline_exceeded", "the request ran past its deadline (the client's, or gateway.request_timeout_s); "
                             "raise it or lower max_tokens"))
    if streaming is not None:
        streaming[end] = task
    try:
        while True:
            if ended is None:
                waiting = True
                try:
                    chunk = await anext(stream)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if ended is None:
                        raise  # the client went away
                    if hasattr(task, "uncancel"):  # 3.11+: this cancellation was ours, and is handled
                        task.uncancel()
                finally:
                    waiting = False
            if ended is not None:
                raise ended
            yield chunk
    finally:
        timer.cancel()
        if streaming is not None:
            streaming.pop(end, None)
        await stream.aclose()
