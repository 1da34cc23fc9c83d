"""Runs one request across a pool's actors, and carries it through actor failures.

reserve KV on a decode actor (all but the prompt prefix it caches already) ->
offer to prefill actors, those likely holding the prompt's prefix first (a
PrefixIndex from their reports), forwarding on rejection -> prefill streams the
first token and writes the KV after that prefix into the lease -> the decode
actor streams the rest. When an actor dies, the request goes on: a lost
prefill is retried on another prefill actor; a lost decode is re-prefilled
from the prompt plus every token already sent, so the stream just continues.
Which actors to try, in which order, and when to give up is the router's choice
(mesh.routing, a policy object without Ray).

That is the split path. The pool's mode (mesh.serving_mode) picks it or the whole path (one
actor runs the request: a both actor in aggregated mode, a decode actor when the auto mode's
conditional policy keeps a short prompt local), per attempt, from the actors serving now.
Tokens from a decode or whole-path actor come on its token feed (mesh.token_feed: one Ray
stream per actor for all the requests sent to it from here).

Not every failed attempt is a death: a failed KV transfer, or an actor giving the request
back (RequestMoved, a drain that ran out of time), is retried without counting the actor as
lost. A death is reported to the pool (its supervisor replaces the actor), and while a role
has no live actor but a replacement is on its way, the request waits for it until its own
deadline. Each retry is an attempt of its own (mesh.attempt: its own id, the tokens already
sent in its prompt); only the first attempt's offers stop at the admission deadline.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from typing import AsyncIterator, Callable

import ray

from mesh.api import ActorState, Committed, FirstToken, Lease, OfferReply, Role, StreamChunk
from mesh.attempt import Attempt, Event, Request
from mesh.errors import MeshError, RequestMoved
from mesh.serving_mode import ConditionalDisaggregation, Mode, PlacementState
from mesh.pool import Member, Pool
from mesh.prefix_index import PrefixIndex
from mesh.routing import CrossScenarioOverflow, ForwardOnRejection, Host, Neighbour
from mesh.token_feed import Feeds
from mesh.tpot_fit import tpot_fit

log = logging.getLogger(__name__)

_ACTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class Dispatcher:
    def __init__(self, pool: Pool, router: ForwardOnRejection | None = None, max_attempts: int = 4,
                 clock: Callable[[], float] = time.monotonic, margin_s: float = 0.1,
                 conditional: ConditionalDisaggregation | None = None,
                 overflow: CrossScenarioOverflow | None = None, priority: int = 0,
                 neighbours: Callable[[], list[Neighbour]] = list,
                 transfer_s: Callable[[int], float] | None = None):
        """overflow, priority, neighbours: a refused request goes on to the neighbours' prefill
        actors by this policy (None: never), as a request of this pool's scenario's priority.
        transfer_s: the predicted KV transfer time of n prompt tokens (the performance model); with
        a request's tpot_s, the decode actors where it would meet its TPOT are tried first."""
        self.pool = pool
        self.router = router or ForwardOnRejection()
        self.overflow, self.priority, self.neighbours = overflow, priority, neighbours
        self.transfer_s = transfer_s
        self.conditional = conditional or ConditionalDisaggregation()  # local or remote prefill, in auto mode
        self.prefixes = PrefixIndex()  # which prefill actors likely hold which prompt prefixes
        self.feeds = Feeds()  # the token feeds of the actors this dispatcher sent requests to
        self.max_attempts = max_attempts  # tries of one request, each after a failed one
        self.clock = clock
        # A wait for a replacement ends this long before the request's end, so that the
        # caller hears UNAVAILABLE rather than its deadline passing.
        self.margin_s = margin_s

    async def close(self) -> None:
        """Stops reading the actors' token feeds (before the actors stop)."""
        await self.feeds.close()

    async def generate(self, req: Request, events: list[Event] | None = None) -> AsyncIterator[StreamChunk]:
        """Yields the request's output, chunk by chunk, until one is `finished`."""
        events = events if events is not None else []
        sent: list[int] = []
        lost: set[str] = set()
        for attempt in range(self.max_attempts):
            if attempt:
                events.append(Event("retry", {"attempt": attempt, "tokens_sent": len(sent)}))
            step = Attempt.of(req, sent, attempt)
            try:
                whole = self._whole(step, lost, events)
                if whole:
                    stream = self._aggregated(step, whole, lost, events)
                else:
                    stream = self._disaggregated(step, lost, events)
                async with contextlib.aclosing(stream):  # a consumer that stops early frees the actors' work
                    async for chunk in stream:
                        sent.extend(chunk.token_ids)
                        yield chunk
                        if chunk.finished:
                            return
            except _Again as e:
                if e.lost:
                    lost.add(e.actor_id)
                events.append(Event(e.event, {"actor": e.actor_id, "phase": e.phase, "reason": e.reason}))
                continue
        raise MeshError("unavailable", f"request {req.request_id} failed on {self.max_attempts} attempts; "
                        f"lost actors: {sorted(lost)}")

    def _lost(self, member: Member, phase: str, error: Exception) -> "_Again":
        """A call failed as if the actor died: the pool's supervisor hears of it."""
        certain = not isinstance(error, ray.exceptions.ActorUnavailableError)
        self._owner(member).report_lost(member.actor_id, f"a call during {phase} failed: {type(error).__name__}",
                                        certain)
        return _Again(member.actor_id, phase, "actor_lost", type(error).__name__, lost=True)

    def _owner(self, member: Member) -> Pool:
        """The pool the actor belongs to: this one, or a neighbour's that prefilled a request."""
        if member.actor_id in self.pool.members:
            return self.pool
        return next((n.pool for n in self.neighbours() if member.actor_id in n.pool.members), self.pool)

    def _live(self, role: Role | tuple[Role, ...], lost: set[str]) -> list[Member]:
        roles = role if isinstance(role, tuple) else (role,)
        return [m for r in roles for m in self.pool.by_role(r) if m.actor_id not in lost]

    def _serving(self, roles: tuple[Role, ...], lost: set[str]) -> bool:
        return any(m.info.state is ActorState.SERVING for m in self._live(roles, lost))

    def _whole(self, step: Attempt, lost: set[str], events: list[Event]) -> tuple[Role, ...]:
        """The roles of the actors that run this attempt whole, or () for the split path
        (prefill actor, then decode actor). The pool's mode decides among the actors serving;
        a pool switching modes (its actors flip one at a time) runs the request on whatever
        serves: both actors whole, else prefill with decode actors, else any actor whole."""
        mode = self.pool.mode
        split = self._serving((Role.PREFILL,), lost) and self._serving((Role.DECODE,), lost)
        if mode is Mode.AGGREGATED and self._serving((Role.BOTH,), lost):
            return (Role.BOTH,)
        if mode is not Mode.AGGREGATED and split:
            if mode is Mode.AUTO:
                placement = self.conditional.decide(self._placement_state(step, lost))
                events.append(Event("placement", {"mode": mode.value, "decision": placement.decision,
                                                  "reason": placement.reason}))
                if placement.local:
                    return (Role.DECODE, Role.BOTH)
            return ()
        if self.pool.switching:
            if self._serving((Role.BOTH,), lost):
                return (Role.BOTH,)
            if split:
                return ()
            if self._serving(_ANY, lost):
                return _ANY
        # the mode's own actors, serving or not (a drain may end, a replacement may be starting)
        both = mode is Mode.AGGREGATED or (self.pool.by_role(Role.BOTH) and not self.pool.by_role(Role.PREFILL))
        return (Role.BOTH,) if both else ()

    def _placement_state(self, step: Attempt, lost: set[str]) -> PlacementState:
        """The conditional choice's inputs, from the actors' last load reports: the decode actor
        that would run the request whole (as `_aggregated` picks it) and the least queued
        prefill actor."""
        cached = self._cached_tokens((Role.DECODE,), step)
        local = self.router.prefill_order(self._live(Role.DECODE, lost), cached)[0]
        prefill = min(self._live(Role.PREFILL, lost), key=lambda m: m.info.load.queued_prompt_tokens)
        return PlacementState(len(step.request.token_ids), cached.get(local.actor_id, 0),
                              local.info.load.prefill_tokens_per_s,
                              prefill.info.load.queued_prompt_tokens, prefill.info.load.prefill_tokens_per_s)

    async def _members(self, role: Role | tuple[Role, ...], lost: set[str], step: Attempt,
                       events: list[Event]) -> list[Member]:
        """The role's (or roles') live actors. While there are none but one is starting (a
        replacement, for one), waits for it, up to the request's end; raises UNAVAILABLE when
        none comes."""
        roles = role if isinstance(role, tuple) else (role,)
        names = " or ".join(r.value for r in roles)
        waiting = False
        while True:
            live = self._live(roles, lost)
            if live:
                return live
            time_left = step.end - self.margin_s - self.clock()
            if not any(self.pool.replacing(r) for r in roles):
                raise MeshError("unavailable", f"no live {names} actor in the pool, and none is starting")
            if time_left <= 0:
                raise MeshError("unavailable", f"no live {names} actor in the pool: one is starting, but not "
                                "in time for the request's deadline; retry later")
            if not waiting:
                waiting = True
                events.append(Event("waiting_for_actor", {"role": names}))
            await self.pool.changed(time_left)

    async def _aggregated(self, step: Attempt, roles: tuple[Role, ...], lost: set[str],
                          events: list[Event]) -> AsyncIterator[StreamChunk]:
        live = await self._members(roles, lost, step, events)
        # a draining actor still takes what reaches it, but serving ones go first
        live = [m for m in live if m.info.state is ActorState.SERVING] or live
        cached = self._cached_tokens(roles, step)
        member = self.router.prefill_order(live, cached)[0]
        events.append(Event("placed", {"actor": member.actor_id, **_prefix_choice(cached, member)}))
        self.prefixes.placed(member.actor_id, step.request.token_ids)
        feed = self.feeds.of(member.actor_id, member.handle)
        call = member.handle.generate.remote(step.request, feed.feed_id)
        try:
            async with contextlib.aclosing(feed.follow(step.request.request_id, call)) as chunks:
                async for chunk in chunks:
                    if chunk.finished:
                        call = None
                    yield chunk
        except _ACTOR_LOST as e:
            raise self._lost(member, "generate", e) from None
        except RequestMoved as e:
            raise _moved(member, "generate", e) from None
        finally:
            _cancel(call)

    async def _disaggregated(self, step: Attempt, lost: set[str],
                             events: list[Event]) -> AsyncIterator[StreamChunk]:
        request = step.request
        decode, lease = await self._reserve(step, lost, events)
        committed = False
        pstream = dstream = dchunks = None  # Ray calls still running: cancelled if the request ends early
        keeper = asyncio.create_task(self._keep_lease(decode, lease))
        try:
            prefill = await self._offer(step, lost, events)
            pstream = prefill.handle.prefill.options(num_returns="streaming").remote(request, lease)
            try:
                first: FirstToken = await (await pstream.__anext__())
            except _ACTOR_LOST as e:
                raise self._lost(prefill, "prefill", e) from None
            except RequestMoved as e:
                raise _moved(prefill, "prefill", e) from None
            events.append(Event("first_token", {"prefill": prefill.actor_id, "decode": decode.actor_id}))
            self.prefixes.placed(prefill.actor_id, request.token_ids)
            finished = first.finish_reason is not None
            if finished:
                pstream = None  # the prefill call ends with its first message
            yield StreamChunk(first.token_ids, first.text, first.logprobs, finished, first.finish_reason,
                              len(request.prompt_token_ids), len(request.output_token_ids) + len(first.token_ids),
                              first.top_logprobs)
            if finished:
                return
            # the decode span hangs under the transfer span the prefill actor opened
            dreq = dataclasses.replace(request, output_token_ids=request.output_token_ids + first.token_ids,
                                       trace_context=first.trace_context or request.trace_context)
            feed = self.feeds.of(decode.actor_id, decode.handle)
            dstream = decode.handle.decode.remote(lease.lease_id, dreq, feed.feed_id)
            dchunks = feed.follow(dreq.request_id, dstream)  # from now: its first chunk may come before the commit
            try:
                commit: Committed = await (await pstream.__anext__())
            except _ACTOR_LOST as e:
                raise self._lost(prefill, "transfer", e) from None
            except RequestMoved as e:
                raise _moved(prefill, "transfer", e) from None
            except MeshError as e:  # both actors may be fine: try the transfer again, same actors or others
                log.warning("request %s: %s", request.request_id, e)
                raise _Again(decode.actor_id, "transfer", "transfer_failed", e.message) from None
            pstream = None
            committed = True
            keeper.cancel()
            events.append(Event("kv_transfer", {**commit.transfer.to_dict(), "skipped_tokens": commit.skipped_tokens,
                                                "exposed_s": commit.seconds, "prefill": prefill.actor_id,
                                                "decode": decode.actor_id}))
            try:
                async for chunk in dchunks:
                    if chunk.finished:
                        dstream = None
                    yield chunk
            except _ACTOR_LOST as e:
                raise self._lost(decode, "decode", e) from None
            except RequestMoved as e:
                raise _moved(decode, "decode", e) from None
        finally:
            keeper.cancel()
            _cancel(pstream)
            _cancel(dstream)
            if dchunks is not None:
                await dchunks.aclose()
            if not committed or dstream is not None:
                # Not committed, or the decode call may never have run to take the KV: a
                # release frees whatever no decode call took (a no-op once one has).
                await _quietly(decode.handle.release_lease.remote(lease.lease_id))

    async def _keep_lease(self, decode: Member, lease: Lease) -> None:
        """Renews the lease while its prefill waits in queues or runs: a long prompt under load
        may take longer than one time to live. Stops once the lease ended or was committed."""
        while True:
            await asyncio.sleep(lease.ttl_s / 3)
            try:
                if not await decode.handle.renew_lease.remote(lease.lease_id):
                    return
            except Exception:  # the decode actor is gone: the request learns it from its own calls
                return

    async def _reserve(self, step: Attempt, lost: set[str], events: list[Event]) -> tuple[Member, Lease]:
        while True:
            members = await self._members(Role.DECODE, lost, step, events)
            align, sizes = self._kv_layout(lost)
            last_error = None
            meets = tpot_fit(self.router, step, members, self.transfer_s)
            for member in self.router.decode_order(members, meets=meets):
                try:
                    # The lease holds the prompt's KV; the decode actor grows it from there.
                    lease: Lease = await member.handle.reserve.remote(step.request.token_ids, align, sizes)
                    events.append(Event("decode_reserved", {"actor": member.actor_id,
                                                            "prefix_tokens": lease.prefix_tokens,
                                                            "prefix_blocks": lease.prefix_blocks}))
                    return member, lease
                except MeshError as e:
                    last_error = e
                    events.append(Event("decode_rejected", {"actor": member.actor_id, "reason": e.message}))
                except _ACTOR_LOST as e:
                    lost.add(member.actor_id)
                    self._lost(member, "reserve", e)
            if last_error is not None:
                raise MeshError("resource_exhausted", "no decode actor has room for the request's KV",
                                retry_after_s=last_error.retry_after_s)
            # every one was dead: wait for their replacements, if any come

    def _kv_layout(self, lost: set[str]) -> tuple[int, list[int]]:
        """What a lease is reserved for: whichever prefill actor takes the request sends whole
        blocks of its own after the prefix the decode actor already holds (the block sizes'
        least common multiple), from each of its tensor-parallel ranks the KV heads that rank
        holds (the sizes)."""
        prefills = self._live(Role.PREFILL, lost)
        return (math.lcm(*(m.info.block_size or 1 for m in prefills)),
                sorted({m.info.tensor_parallel_size for m in prefills} or {1}))

    async def _offer(self, step: Attempt, lost: set[str], events: list[Event]) -> Member:
        """Offers to prefill actors idle-first, forwarding on each rejection; when every actor
        rejected, offers the request to other scenarios' actors (`_overflow`), then waits for the
        shortest retry hint and offers again, until one accepts, the forward cap is reached or
        the deadline passes."""
        retry_after = None
        offers = 0
        cached = self._cached_tokens(Role.PREFILL, step)
        while True:
            candidates = self.router.prefill_order(await self._members(Role.PREFILL, lost, step, events), cached)
            for member in candidates:
                time_left = step.deadline - self.clock()
                if not self.router.may_offer(offers, time_left):
                    break
                try:
                    d = await self._ask(member, step, step.ttft_budget_s, cached.get(member.actor_id, 0))
                except _ACTOR_LOST as e:
                    lost.add(member.actor_id)
                    self._lost(member, "offer", e)
                    continue
                offers += 1
                if d.accept:
                    events.append(Event("prefill_accepted", {"actor": member.actor_id, "forwards": offers - 1,
                                                             "predicted_ttft_s": d.predicted_ttft_s,
                                                             **_prefix_choice(cached, member)}))
                    return member
                events.append(Event("prefill_rejected", {"actor": member.actor_id, "reason": d.reason,
                                                         "retry_after_s": d.retry_after_s}))
                retry_after = d.retry_after_s if retry_after is None else min(retry_after, d.retry_after_s)
            guest = await self._overflow(step, lost, events, offers)
            if guest is not None:
                return guest
            if not self.router.may_offer(offers, step.deadline - self.clock()):
                raise self.router.give_up(offers, retry_after)
            await asyncio.sleep(self.router.pause_s(retry_after, step.deadline - self.clock()))

    async def _ask(self, member: Member, step: Attempt, budget_s: float | None, cached: int) -> OfferReply:
        """The actor's answer to an offer; one that does not come in time (a stalled actor) is a
        rejection. The wait is in real time: the deadlines are on the dispatcher's clock. The actor
        judges its first token against the TTFT budget and the request's end, not the admission
        deadline: that bounds how long offers go on, and a prompt whose TTFT target is longer than
        it (xlong's 12 s against 5 s) would otherwise find only idle actors."""
        wait_s = self.router.offer_timeout_s
        try:
            return await asyncio.wait_for(
                member.handle.offer.remote(len(step.request.token_ids), budget_s, step.end - self.clock(), cached),
                wait_s)
        except asyncio.TimeoutError:
            return OfferReply(False, f"no answer to the offer within {wait_s:.3f}s", retry_after_s=wait_s)

    async def _overflow(self, step: Attempt, lost: set[str], events: list[Event], offers: int) -> Member | None:
        """This pool refused the request: while its decode actors have KV to spare (by their last
        reports), offers it to the neighbours' prefill actors that can send its KV to the lease
        reserved here (mesh.routing.CrossScenarioOverflow picks and judges them); the actor that
        takes it, or None."""
        if self.overflow is None:
            return None
        decode = [m.info.load for m in self._live(Role.DECODE, lost)]
        if not self.overflow.due(sum(d.free_blocks for d in decode), sum(d.num_blocks for d in decode)):
            return None
        align, sizes = self._kv_layout(lost)
        hosts = [Host(n.scenario, n.priority, n.ttft_s,
                      [m for m in n.pool.by_role(Role.PREFILL) if m.actor_id not in lost
                       and m.info.state is ActorState.SERVING and align % (m.info.block_size or 1) == 0
                       and m.info.tensor_parallel_size in sizes]) for n in self.neighbours()]
        for host, member in self.overflow.candidates(self.priority, hosts):
            if step.deadline <= self.clock():
                return None
            budget = self.overflow.budget_s(step.ttft_budget_s, host, member)
            try:
                d = await self._ask(member, step, budget, 0)
            except _ACTOR_LOST as e:
                lost.add(member.actor_id)
                self._lost(member, "offer", e)
                continue
            facts = {"actor": member.actor_id, "forwarded_to_scenario": host.scenario}
            if self.overflow.takes(d, budget):
                events.append(Event("prefill_accepted", {**facts, "forwards": offers,
                                                         "predicted_ttft_s": d.predicted_ttft_s, "order": "overflow"}))
                return member
            events.append(Event("prefill_rejected", {**facts, "reason": d.reason if not d.accept else
                                                     f"predicted TTFT {d.predicted_ttft_s:.3f}s over the host's "
                                                     f"budget {budget:.3f}s", "retry_after_s": d.retry_after_s}))
        return None

    def _cached_tokens(self, role: Role | tuple[Role, ...], step: Attempt) -> dict[str, int]:
        """Per actor of the role (or roles), the prompt tokens it likely holds, from its last
        report and from where this dispatcher placed prompts since."""
        members = self._live(role, set())
        self.prefixes.sync({m.actor_id: m.info.prefix for m in members})
        return self.prefixes.expected_tokens(step.request.token_ids, [m.actor_id for m in members])


def _prefix_choice(cached: dict[str, int], member: Member) -> dict:
    """For the request's span: whether a likely prefix hit put the actor first, and how long."""
    expected = cached.get(member.actor_id, 0)
    return {"order": "prefix" if expected else "idle", "expected_prefix_tokens": expected}


_ANY = (Role.BOTH, Role.DECODE, Role.PREFILL)  # every actor runs a request whole (MeshActor.generate)


class _Again(Exception):
    """An attempt failed and the request goes on with the next: the actor died (lost), a
    transfer failed, or the actor gave the request back. `event` names the span event."""

    def __init__(self, actor_id: str, phase: str, event: str, reason: str, lost: bool = False):
        super().__init__(f"{event}: actor {actor_id} during {phase}: {reason}")
        self.actor_id, self.phase, self.event, self.reason, self.lost = actor_id, phase, event, reason, lost


def _moved(member: Member, phase: str, error: RequestMoved) -> _Again:
    """The actor gave the request back unfinished (drained): it is alive and well."""
    return _Again(member.actor_id, phase, "moved", error.message)


def _cancel(stream) -> None:
    """Stops a Ray call whose request nobody reads any more: the actor aborts its work."""
    if stream is not None:
        try:
            ray.cancel(stream)
        except Exception:  # the actor is gone: nothing left to stop
            pass


async def _quietly(ref) -> None:
    try:
        await ref
    except Exception:  # the actor may be gone; its lease then expires on its own
        pass
