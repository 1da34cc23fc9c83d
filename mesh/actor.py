"""One mesh actor: an engine that serves the prefill or the decode role, and flips in place.

prefill: answers offers at once (admission), prefills with other requests in one
         batch, streams the first token back, writes the KV into the decode
         actor's lease and commits.
decode:  reserves KV blocks for a request (a lease), waits for the commit, joins
         the request to its decode batch and streams tokens on its caller's token feed
         (mesh/token_feed.py), one message per step for all the requests it feeds.
both:    serves whole requests alone (aggregated mode; one-actor pools).
A flip drains the current role's work, then switches; weights stay loaded.

An actor may span tensor-parallel ranks (its engine's worker processes, each holding some KV
heads; the pool reserves their devices in a placement group). A rank's death, seen by a failed
step or by a look every RANK_POLL_S, takes the actor down: it ends its leases and connections,
stops the other ranks and ends its process, so that Ray fails its calls in flight (their
requests move on) and the pool's supervisor replaces it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
from typing import AsyncIterator

from mesh import tracing
from mesh.admission import Offer, PrefillAdmission, PrefillLoad
from mesh.api import (ActorReport, ActorRequest, ActorSpec, ActorState, Committed, DrainResult, FeedItem, FirstToken,
                      Lease, LoadReport, OfferReply, PrefixCacheStats, Role, StreamChunk)
from mesh.async_engine import AsyncEngine
from mesh.engine.errors import EngineError, RequestError
from mesh.engine.parallel import TensorParallelError
from mesh.engine.sampling_params import SamplingParams
from mesh.engine.prefix_cache import PrefixCache
from mesh.engine.shard import kv_head_ranges
from mesh.errors import MeshError, RequestMoved
from mesh.faults import FaultPoints
from mesh.kv import KVConnector, RankPool
from mesh.prefix_index import PrefixRecord, chunk_tokens_for
from mesh.token_feed import Outbox
from transport import TransferError
from transport.address import for_node
from transport.memory import pool_zeros

log = logging.getLogger(__name__)

GIVE_BACK_S = 30.0  # how long a drain waits for the clean-up of the requests it gave back
RANK_POLL_S = 0.2  # how often an actor with tensor-parallel ranks looks whether they all live
GO_DOWN_S = 5.0  # how long an actor that lost a rank takes to end its leases and connections
RANK_LOST_EXIT = 18  # the exit code of an actor that lost a rank
LEASE_POLL_S = 0.05  # how often a drain looks whether the leases reserved here have ended


def _movable(method):
    """Makes an actor method that streams one request movable (MeshActor._stream_movably)."""
    @functools.wraps(method)
    async def stream(self: MeshActor, *args, **kwargs) -> AsyncIterator:
        async for message in self._stream_movably(method(self, *args, **kwargs)):
            yield message
    return stream


class MeshActor:
    def __init__(self, spec: ActorSpec):
        self.spec = spec
        self.role = spec.role
        self.state = ActorState.STARTING
        self.admission = PrefillAdmission()
        self.queued_tokens = 0
        self.queued_requests = 0
        self.active: set[str] = set()  # requests in flight on this actor
        self.engine: AsyncEngine | None = None
        self.kv: KVConnector | None = None  # leases, prefix holds and transfers: all KV beyond a request's own
        self._idle = asyncio.Event()
        self._give_back = asyncio.Event()  # set when a drain ran out of time: requests here move on
        self._stopped = asyncio.Event()
        self._rank_watch: asyncio.Task | None = None
        self._going_down = False
        self.faults = FaultPoints(self.spec.faults, self.spec.actor_id, self.spec.fault_log)
        self.outbox = Outbox()  # the token feeds callers opened

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> ActorReport:
        from mesh.engine.engine import Engine  # torch loads inside the actor process only

        tracing.configure("pdmesh-actor", self.spec.otel_env)
        try:
            # the KV pool in the transport's memory (huge pages on CPU), which it moves faster
            self.engine = await AsyncEngine.build(lambda: Engine(self.spec.engine, pool_zeros))
        except EngineError as e:
            raise MeshError("invalid_argument", str(e)) from None
        engine = self.engine.engine
        if engine.rank_pools is None:  # the transport moves each rank's heads in the pools this process maps
            engine.close()
            raise MeshError("invalid_argument", engine.ranks.unshared)
        if engine.ranks is not None:
            self.engine.on_broken = self._rank_lost
            self._rank_watch = asyncio.create_task(self._watch_ranks(engine.ranks))
        self.engine.start()
        bs = engine.blocks.block_size
        cached = engine.blocks.num_blocks * bs if isinstance(engine.blocks, PrefixCache) else 0
        self.prefixes = PrefixRecord(chunk_tokens_for(bs, self.spec.prefix_chunk_tokens), cached)
        import ray

        # This node's address, advertised to senders on other nodes (also pins UCX to a named NIC).
        transport = for_node(self.spec.transport, ray.util.get_node_ip_address())
        self.kv = KVConnector(self.engine, transport, RankPool.of_engine(engine), self.faults, self.spec.layerwise_kv)
        if self.role is not Role.PREFILL:
            await self.kv.open_receiver()
        if self.spec.warmup:
            await self._warmup()
        self.state = ActorState.SERVING
        return await self.info()

    async def _warmup(self) -> None:
        """One prefill and a few decode steps: first-call costs land here, and the
        admission policy starts from a measured prefill speed."""
        eng = self.engine.engine
        vocab = eng.model_config.vocab_size
        prompt = [i % vocab for i in range(1, min(256, eng.max_model_len // 2))]
        add = lambda: eng.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))
        async for _ in self.engine.stream(add):
            pass

    async def info(self) -> ActorReport:
        import ray

        eng = self.engine.engine if self.engine else None
        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        return ActorReport(
            self.spec.actor_id, self.spec.scenario, self.role, self.state, pid=os.getpid(),
            node=ray.util.get_node_ip_address() if ctx else None, device=str(eng.device) if eng else None,
            model=self.spec.engine.model, block_size=eng.blocks.block_size if eng else None,
            tensor_parallel_size=self.spec.engine.tensor_parallel_size,
            placement_group=ctx.get_placement_group_id() if ctx else None, load=self.load(),
            prefix=self.prefixes.report() if eng else None)

    def load(self) -> LoadReport:
        if self.engine is None:
            return LoadReport(self.queued_tokens, self.queued_requests, len(self.active))
        eng, stats = self.engine.engine, self.engine.stats
        return LoadReport(self.queued_tokens, self.queued_requests, len(self.active), eng.blocks.num_free,
                          eng.blocks.num_blocks, stats.prefill_tokens_per_s, stats.decode_step_s,
                          _cache_stats(eng.blocks), tuple(stats.samples))

    async def ping(self) -> str:
        return self.spec.actor_id

    async def until_stopped(self) -> str:
        """Returns when the actor shuts down. The supervisor keeps one such call open per actor:
        Ray fails it the moment the actor's process dies, which is how a death is noticed at once."""
        await self._stopped.wait()
        return self.spec.actor_id

    async def shutdown(self) -> None:
        if self._rank_watch is not None:
            self._rank_watch.cancel()  # the ranks stop now, on purpose
        self._stopped.set()
        tracing.flush()
        if self.kv:
            await self.kv.close()
        if self.engine:
            await self.engine.close()

    # -- tensor-parallel ranks ---------------------------------------------------------------
    async def _watch_ranks(self, ranks) -> None:
        """Sees a rank die while no step runs (a step sees it at once)."""
        while True:
            await asyncio.sleep(RANK_POLL_S)
            dead = ranks.dead()
            if dead:
                self._rank_lost(TensorParallelError(f"tensor-parallel {', '.join(dead)} died"))
                return

    def _rank_lost(self, error: TensorParallelError) -> None:
        if not self._going_down:
            self._going_down = True
            asyncio.ensure_future(self._go_down(error))

    async def _go_down(self, error: TensorParallelError) -> None:
        """The engine cannot step without the lost rank: end the leases here (their blocks are
        freed, their senders told by the closed connections), stop the other ranks, then end
        this process, as a crash would but with the peers told."""
        log.error("actor %s: %s: going down, for the pool to replace it", self.spec.actor_id, error)
        self.state = ActorState.DRAINING  # offers and reservations are refused from here on
        self.engine.engine.ranks.failure(error)  # stops the ranks still running
        try:
            await asyncio.wait_for(self.kv.close(), GO_DOWN_S)
        except Exception as e:  # going down all the same
            log.warning("actor %s: closing its KV connections failed: %r", self.spec.actor_id, e)
        tracing.flush()
        os._exit(RANK_LOST_EXIT)

    def _kill_last_rank(self) -> None:
        ranks = self.engine.engine.ranks
        ranks.kill(ranks.size - 1)

    # -- prefill role ----------------------------------------------------------------------
    async def offer(self, prompt_tokens: int, ttft_budget_s: float | None = None,
                    time_left_s: float = float("inf"), cached_tokens: int = 0) -> OfferReply:
        """Accept or reject at once, with a reason and a retry hint. cached_tokens: of the prompt,
        likely in this actor's prefix cache (the dispatcher's guess)."""
        if self.state is not ActorState.SERVING or self.role is Role.DECODE:
            return OfferReply(False, f"actor is {self.state.value} as {self.role.value}")
        load = PrefillLoad(self.queued_tokens, self.queued_requests, self.engine.stats.prefill_tokens_per_s)
        return self.admission.decide(load, Offer(prompt_tokens, ttft_budget_s or self.spec.ttft_budget_s,
                                                 time_left_s, cached_tokens))

    @_movable
    async def prefill(self, request: ActorRequest, lease: Lease | None) -> AsyncIterator[FirstToken | Committed]:
        """Yields a FirstToken as soon as the first token is sampled, then, when the KV went
        into the lease, Committed. The first message carries the trace context of the KV
        transfer, the decode span's parent."""
        self._require(Role.PREFILL, Role.BOTH)
        rid, ids = request.request_id, list(request.prompt_token_ids)
        sent = list(request.output_token_ids)  # generated before the request moved here
        params = request.params
        eng = self.engine.engine
        span = tracing.start_span("prefill", request.trace_context, {
            "pdmesh.actor": self.spec.actor_id, "pdmesh.request_id": rid, "pdmesh.prompt_tokens": len(ids)})
        transfer = error = None
        self.queued_tokens += len(ids) + len(sent)
        self.queued_requests += 1
        self.active.add(rid)
        queued = True
        try:
            self.faults.reached("prefill", rid)
            if lease is not None and self.kv.layerwise:
                self.kv.stream(rid, lease.parts, lease.prefix_tokens)
            last = None
            async for outs in self.engine.stream(lambda: eng.add_request(ids, params, rid, prefill_only=True,
                                                                          output_ids=sent)):
                last = outs[-1]
            self.queued_tokens -= len(ids) + len(sent)
            self.queued_requests -= 1
            queued = False
            self.prefixes.touch(ids)
            if last.finish_reason == "prefilled" and lease is not None:
                transfer = tracing.start_span("kv_transfer", tracing.carrier_of(span),
                                              {"pdmesh.actor": self.spec.actor_id, "pdmesh.request_id": rid})
            tracing.end(span)
            span = None
            yield FirstToken(last.token_ids, last.text, last.logprobs,
                             None if last.finish_reason == "prefilled" else last.finish_reason,
                             tracing.carrier_of(transfer) if transfer is not None else None, last.top_logprobs)
            if transfer is None:
                return
            desc = lease.descriptor
            # the decode actor holds the lease's skipped prefix already
            written = await self.kv.send(rid, lease.parts, lease.prefix_tokens)
            stats = written.stats
            self.engine.stats.note("transfer", stats.ops, stats.bytes, stats.duration_s)
            transfer.set_attributes({"kv.bytes": stats.bytes, "kv.runs": stats.runs, "kv.ops": stats.ops,
                                     "kv.layers": stats.layers, "kv.gbps": stats.gbps, "kv.backend": stats.backend,
                                     "kv.strategy": stats.strategy, "kv.path": stats.path, "kv.blocks": written.blocks,
                                     "kv.skipped_tokens": written.skipped_tokens, "kv.peer": f"{desc.host}:{desc.port}"})
            yield Committed(stats, written.skipped_tokens, written.seconds)
        except RequestError as e:
            error = e
            raise MeshError("invalid_argument", str(e)) from None
        except TransferError as e:
            error = e
            raise MeshError("unavailable", f"KV transfer failed: {e}") from None
        except BaseException as e:  # cancelled by the gateway, or a failure: the span says so
            error = e
            raise
        finally:
            for open_span in (span, transfer):
                if open_span is not None:
                    tracing.end(open_span, error)
            if queued:
                self.queued_tokens -= len(ids) + len(sent)
                self.queued_requests -= 1
            await self.kv.request_finished(rid)  # its blocks go back; a no-op once released
            self._done(rid)

    # -- decode role -----------------------------------------------------------------------
    async def reserve(self, prompt_token_ids: list[int], align_tokens: int = 1,
                      sender_sizes: list[int] | tuple[int, ...] = (1,)) -> Lease:
        """A lease for a request's prompt KV: admission by free blocks. The longest prefix this
        actor's prefix cache holds, in whole blocks of `align_tokens` (the prefill side's block
        size), is held here and left out of the lease: "prefix_tokens" and "prefix_blocks" say
        how much, and the prefill side sends only what follows. sender_sizes: the tensor-parallel
        sizes of the prefill actors that may send; the lease comes in parts (per rank here and
        range of KV heads) that one rank of each can write."""
        if self.state is not ActorState.SERVING or self.role is Role.PREFILL or not self.kv.receiving:
            raise MeshError("unavailable", f"actor {self.spec.actor_id} is not serving decode")
        try:
            senders = [kv_head_ranges(self.engine.engine.model_config, size) for size in sender_sizes]
        except EngineError as e:
            raise MeshError("invalid_argument", f"a sender's tensor-parallel size: {e}") from None
        r = await self.kv.reserve(list(prompt_token_ids), align_tokens, senders)
        return Lease(r.leases[0], r.prefix_tokens, r.prefix_blocks, r.leases[1:])

    async def renew_lease(self, lease_id: str) -> bool:
        """Another lease_ttl_s for a lease whose prefill is queued or running; False once it ended."""
        return self.kv.renew_lease(lease_id) if self.kv else False

    async def release_lease(self, lease_id: str) -> bool:
        return self.kv.release_lease(lease_id) if self.kv else False

    async def decode(self, lease_id: str, request: ActorRequest, feed_id: str) -> None:
        """Waits for the lease's commit, then streams the request's tokens (first excluded) on
        the feed `feed_id`."""
        rid = request.request_id
        params = request.params
        eng = self.engine.engine

        async def wait_and_add():
            return await self.kv.take(lease_id, lambda blocks: eng.add_prefilled(
                request.prompt_token_ids, request.output_token_ids, params, blocks, rid))

        await self._fed(feed_id, rid, self._traced("decode", request, wait_and_add, (Role.DECODE, Role.BOTH)))

    # -- both phases on one actor ------------------------------------------------------------
    async def generate(self, request: ActorRequest, feed_id: str) -> None:
        """Serves the whole request, streaming its tokens on the feed `feed_id`."""
        rid, ids = request.request_id, list(request.prompt_token_ids)
        params = request.params
        eng = self.engine.engine

        async def add():
            self.prefixes.touch(ids)  # at once: its prefix is cached here as it computes
            return lambda: eng.add_request(ids, params, rid, output_ids=request.output_token_ids)

        await self._fed(feed_id, rid, self._traced("generate", request, add, (Role.BOTH, Role.PREFILL, Role.DECODE)))

    async def feed(self, feed_id: str) -> AsyncIterator[list[FeedItem]]:
        """The token feed of one caller: every message of the requests it sent with this
        feed_id, one list per step (mesh/token_feed.py). Open until the caller stops reading."""
        async for items in self.outbox.serve(feed_id):
            yield items

    async def _fed(self, feed_id: str, rid: str, work: AsyncIterator[StreamChunk]) -> None:
        """Puts one request's messages on its caller's feed, and last the MeshError that ended
        it, if one did (RequestMoved when a drain gave it back)."""
        await self.outbox.opened(feed_id)
        try:
            async for chunk in self._stream_movably(work):
                self.outbox.put(feed_id, FeedItem(rid, chunk))
        except MeshError as e:
            self.outbox.put(feed_id, FeedItem(rid, error=e))

    async def _traced(self, name: str, request: ActorRequest, prepare, roles: tuple[Role, ...]
                      ) -> AsyncIterator[StreamChunk]:
        """Streams one request's engine outputs, one message per burst of steps, in a span.
        `prepare` is awaited for the engine call that adds the request; the actor must serve
        one of `roles`."""
        self._require(*roles)
        rid = request.request_id
        span = tracing.start_span(name, request.trace_context, {
            "pdmesh.actor": self.spec.actor_id, "pdmesh.request_id": rid})
        error = None
        self.active.add(rid)
        try:
            add = await prepare()
            sent = 0
            async for outs in self.engine.stream(add):
                chunk = _merge(outs)
                if self.faults.faults:
                    self.faults.reached("decode_step", rid, sent + len(chunk.token_ids))
                    self.faults.reached("rank_decode_step", rid, sent + len(chunk.token_ids),
                                        self._kill_last_rank if self.engine.engine.ranks is not None else None)
                sent += len(chunk.token_ids)
                yield chunk
            span.set_attribute("pdmesh.output_tokens", chunk.num_output_tokens)
        except RequestError as e:
            error = e
            raise MeshError("invalid_argument", str(e)) from None
        except BaseException as e:  # a failure, or cancelled by the gateway
            error = e
            raise
        finally:
            tracing.end(span, error)
            self._done(rid)

    # -- role changes ------------------------------------------------------------------------
    async def drain(self, timeout_s: float | None = None) -> DrainResult:
        """Accept nothing new and wait for in-flight work. What is left after the timeout is
        given back: each such request's stream ends with RequestMoved (its dispatcher re-runs
        it on another actor from the prompt plus the tokens sent) once its KV here is freed."""
        self.state = ActorState.DRAINING
        if await self._idle_within(timeout_s or self.spec.drain_timeout_s):
            return DrainResult((), await self.info())
        moved = tuple(sorted(self.active))
        self._give_back.set()
        if not await self._idle_within(GIVE_BACK_S):
            log.warning("actor %s: requests %s still cleaning up %.0f s after they were given back",
                        self.spec.actor_id, sorted(self.active), GIVE_BACK_S)
        return DrainResult(moved, await self.info())

    async def _idle_within(self, timeout_s: float) -> bool:
        """Whether, within timeout_s, every request here ended and every lease reserved here was
        taken by its decode call or ended (its prefill may still be writing the KV)."""
        deadline = time.monotonic() + timeout_s
        while self.active or self.kv.pending_leases:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._idle.clear()
            try:  # a lease ends without a word to us: look again soon
                await asyncio.wait_for(self._idle.wait(), left if self.active else min(left, LEASE_POLL_S))
            except asyncio.TimeoutError:
                pass
        return True

    async def set_role(self, role: Role, drain_timeout_s: float | None = None) -> DrainResult:
        """Drain, switch role in place (same engine and weights), serve again."""
        new = Role(role)
        result = await self.drain(drain_timeout_s)
        if new is Role.PREFILL:
            await self.kv.close_receiver()
        else:
            await self.kv.open_receiver()
        self.role = new
        self._give_back.clear()
        self.state = ActorState.SERVING
        return dataclasses.replace(result, report=await self.info())

    async def join(self, scenario: str, role: Role, ttft_budget_s: float,
                   drain_timeout_s: float | None = None) -> DrainResult:
        """Serves another scenario of the same model from now on (lent between pools)."""
        self.spec = dataclasses.replace(self.spec, scenario=scenario, ttft_budget_s=ttft_budget_s)
        return await self.set_role(role, drain_timeout_s)

    def _require(self, *roles: Role) -> None:
        """A request that reaches an actor no longer serving its role (a flip or a drain got there
        first) moves on: the dispatcher re-runs it elsewhere."""
        taking = self.state is ActorState.SERVING or (self.state is ActorState.DRAINING and not self._give_back.is_set())
        if not taking or self.role not in roles:
            raise RequestMoved(f"actor {self.spec.actor_id} is {self.state.value} as {self.role.value}")

    async def _stream_movably(self, work: AsyncIterator) -> AsyncIterator:
        """Streams one request's messages from `work` until a drain gives the request back: then
        `work` is cancelled where it waits (its own clean-up frees its KV, leases and spans)
        and the stream ends with RequestMoved."""
        give_back = asyncio.ensure_future(self._give_back.wait())
        try:
            while True:
                step = asyncio.ensure_future(work.__anext__())
                try:
                    await asyncio.wait((step, give_back), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    taken = not step.done()  # given back, or this stream was cancelled
                    if taken:
                        step.cancel()
                        await asyncio.gather(step, return_exceptions=True)
                if taken:
                    raise RequestMoved(f"actor {self.spec.actor_id} gave the request back: its drain timed out")
                try:
                    message = step.result()
                except StopAsyncIteration:
                    return
                yield message
        finally:
            give_back.cancel()
            await work.aclose()

    def _done(self, rid: str) -> None:
        self.active.discard(rid)
        if not self.active:
            self._idle.set()


def _cache_stats(blocks) -> PrefixCacheStats | None:
    """The engine's prefix cache figures, in blocks (None when it runs without one)."""
    if not isinstance(blocks, PrefixCache):
        return None
    return PrefixCacheStats(blocks.hits, blocks.queries, blocks.evictions, blocks.num_cached)


def _merge(outs) -> StreamChunk:
    """One message per burst of engine steps."""
    last = outs[-1]
    logprobs = [lp for o in outs for lp in (o.logprobs or [])]
    top = [t for o in outs for t in (o.top_logprobs or [])]
    return StreamChunk([t for o in outs for t in o.token_ids], "".join(o.text for o in outs), logprobs or None,
                       last.finished, last.finish_reason, last.num_prompt_tokens, last.num_output_tokens, top or None)
