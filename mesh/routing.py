"""Placement inside a scenario's pool: which decode actor reserves a request's KV, which
prefill actors are offered the request and in which order, and when to stop forwarding;
and past the pool, which other scenarios' prefill actors take a request it refused.

A plain policy: no Ray, no network. It reads the actors' last load reports and the prompt
tokens each actor likely holds already (mesh.prefix_index) for the order of offers only
(the offer itself decides, from the actor's live state), and the time left to the
request's deadline, so the simulator in simtests/ drives the same code as mesh.dispatch
does live.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Generic, Hashable, Mapping, Protocol, Sequence, TypeVar

from mesh.api import ActorReport, OfferReply
from mesh.errors import MeshError

if TYPE_CHECKING:
    from mesh.pool import Pool


class Candidate(Protocol):
    actor_id: Hashable
    info: ActorReport  # the actor's last report


C = TypeVar("C")


def reported_queue(c: Candidate) -> tuple[int, int]:
    """An actor's queue by its last report: (requests, prompt tokens); what live dispatch orders by."""
    return c.info.load.queued_requests, c.info.load.queued_prompt_tokens


def count_idle(members: Sequence[C], queue: Callable[[C], tuple[int, int]] = reported_queue) -> int:
    """How many of the actors are idle: no request queued for prefill (`queue`'s first figure 0)."""
    return sum(queue(m)[0] == 0 for m in members)


def reported_free(c: Candidate) -> int:
    """An actor's free KV by its last report (blocks); what live dispatch orders decode actors by."""
    return c.info.load.free_blocks


def meets_tpot(transfer_s: float, step_s: float, output_tokens: int, tpot_s: float) -> bool:
    """Whether a request meets its TPOT target when its KV transfer takes transfer_s after the first
    token and each of its other output_tokens - 1 tokens takes one decode step of step_s: the
    transfer is spread over those tokens, so with a few of them it may take most of the target."""
    steps = output_tokens - 1
    return steps <= 0 or transfer_s + steps * step_s <= steps * tpot_s


@dataclass(frozen=True)
class ForwardOnRejection:
    """Offers go first to the actors likely to hold the longest prefix of the prompt, then
    idle-first; a rejection forwards the request to the next actor. When a whole pass was
    rejected, pause for the shortest retry hint and offer again, until an actor accepts,
    `max_forwards` offers were made, or the deadline comes.

    Only `prefix_offers` holders go first: a prefix many requests share (a system prompt)
    must not spend every offer a request has before an idle actor gets one. A holder whose
    queue costs more than its cache saves rejects at once (mesh.admission), so a hot prefix
    spills over to idle actors instead of queueing behind its holders."""
    max_forwards: int = 8  # offers per request, all passes together
    min_retry_pause_s: float = 0.02  # between passes, so that a busy pool is not spun on
    prefix_offers: int = 2  # holders of the prompt's prefix offered before idle-first
    # an actor that has not answered an offer by then (its process stalled) counts as rejecting it:
    # an offer is answered at once from the actor's state, so this is far above any answer's time
    offer_timeout_s: float = 10.0
    # share of the pool's decode KV that must be free for a request to go where its TPOT is met rather
    # than where most KV is free: below it, room decides (on the tidal mix, TPOT placement with
    # decode KV over 60% full cost 1.0% goodput: the next requests wait for the room it took)
    tpot_headroom: float = 0.4

    def prefill_order(self, members: Sequence[C], cached_tokens: Mapping[Hashable, int] | None = None,
                      queue: Callable[[C], tuple[int, int]] = reported_queue) -> list[C]:
        """cached_tokens: per actor id, the prompt tokens it likely holds (none when absent).
        The longest holders first (the least queued of equals), then idle-first. queue: an
        actor's (queued requests, queued prompt tokens); the simulator passes its modelled
        actors' own, live dispatch their last reports."""
        idle_first = sorted(members, key=queue)
        cached = cached_tokens
        if not cached:
            return idle_first
        holders = sorted((m for m in idle_first if cached.get(m.actor_id, 0) > 0),
                         key=lambda m: -cached[m.actor_id])[:self.prefix_offers]
        first = {m.actor_id for m in holders}
        return holders + [m for m in idle_first if m.actor_id not in first]

    def decode_order(self, members: Sequence[C], free: Callable[[C], int] = reported_free,
                     meets: Callable[[C], bool] | None = None) -> list[C]:
        """The most free KV first: reservation is by blocks, and room spreads the load. meets: whether
        the request would meet its TPOT target on an actor, as predicted (None: not predicted); the
        actors where it would come first, the most free of them, so that a request whose KV
        transfer takes most of its TPOT (a long prompt, a few output tokens) decodes where its few
        steps are fast enough. When it would meet it nowhere, or everywhere, the order is by room
        alone. free: as `queue` in prefill_order. Only while `places_by_tpot`."""
        by_room = sorted(members, key=lambda m: -free(m))
        if meets is None:
            return by_room
        fits = [meets(m) for m in by_room]
        return [m for m, ok in zip(by_room, fits) if ok] + [m for m, ok in zip(by_room, fits) if not ok]

    def places_by_tpot(self, free_kv: int, kv: int) -> bool:
        """Whether a pool whose decode actors have free_kv of kv KV (blocks or tokens; kv 0: not known
        yet) places decode KV by the request's predicted TPOT (`decode_order` with `meets`)."""
        return not kv or free_kv >= self.tpot_headroom * kv

    def may_offer(self, offers: int, time_left_s: float) -> bool:
        return offers < self.max_forwards and time_left_s > 0

    def pause_s(self, retry_after_s: float | None, time_left_s: float) -> float:
        """How long to wait after a pass in which every actor rejected."""
        return max(0.0, min(max(retry_after_s or 0.0, self.min_retry_pause_s), time_left_s))

    def give_up(self, offers: int, retry_after_s: float | None) -> MeshError:
        if not offers:
            return MeshError("deadline_exceeded",
                             "the deadline passed before any prefill actor was offered the request")
        return MeshError("resource_exhausted", f"every prefill actor rejected the request ({offers} offers); "
                         "retry later or send fewer prompt tokens",
                         retry_after_s=max(retry_after_s or 0.0, self.min_retry_pause_s))


@dataclass(frozen=True)
class Host(Generic[C]):
    """Another scenario's pool serving the same model: where a refused request may overflow."""
    scenario: str
    priority: int  # the scenario's (scenarios.spec.ScenarioSpec.priority)
    ttft_s: float  # the scenario's TTFT target
    members: Sequence[C]  # its serving prefill actors


@dataclass(frozen=True)
class Neighbour:
    """Another scenario's pool of the same model, whose prefill actors may take this pool's refused
    requests: the live pool (mesh.pool) that mesh.dispatch offers them to, the policy seeing its
    serving prefill actors as a Host."""
    scenario: str
    priority: int
    ttft_s: float  # its TTFT target
    pool: Pool


@dataclass(frozen=True)
class CrossScenarioOverflow:
    """A request its own scenario's prefill actors refused (a whole pass of offers rejected: none
    meets its TTFT budget now, or its offers ran out) is offered to other scenarios' prefill
    actors of the same model, the least queued first; its decode stays where its lease is, in
    its own pool. One big pool absorbs a sub-second burst that two smaller ones each meet
    alone; this lends a burst the neighbours' room without merging the pools.

    The host's own requests come first: an actor takes a guest only while its queue, the
    guest included, stays within `host_share` of the host's own TTFT target (at 1, a guest
    delays the host's next request no more than one of its own within its target would; the
    actor's admission still refuses that request if it would miss), or, when the actor is idle
    and the host has `spare_idle` other idle actors, within the request's own budget (a prompt
    longer than the host's target allows, an xlong one on a long scenario's actor: the host's
    next request finds one of the idle actors it keeps), only hosts whose priority
    is not above the request's scenario's are asked, lower priority hosts first, and the host
    keeps `keep_idle` idle actors to itself. An offer is taken only when the actor predicts the first token
    within that budget: an idle actor accepts anything (mesh.admission), and a prefill that
    misses its TTFT anyway would only take the host's time.

    Only a pool whose decode actors have `decode_headroom` of their KV free overflows: when
    its decode is what runs short, a refused prefill is the pool's admission control, and a
    request prefilled elsewhere would only hold KV and slow the decode batch that the pool's
    next requests need (on the tidal mix, overflow with decode KV full cost 0.5 to 0.7% goodput)."""
    max_offers: int = 2  # offers to other scenarios' actors per refused pass
    host_share: float = 1.0  # of the host's TTFT target, what its queue may hold with a guest in it
    keep_idle: int = 0  # idle prefill actors each host keeps to itself
    # other idle actors a host keeps while an idle one takes a guest past host_share: only a host that
    # is mostly idle lends for long (on the tidal mix 2 cost 0.9% goodput, chat's tide needing more idle
    # actors at once; on the bursty mix 4 and 6 cost 4%, 8 none)
    spare_idle: int = 8
    decode_headroom: float = 0.2  # share of the pool's decode KV that must be free

    def due(self, free_kv: int, kv: int) -> bool:
        """Whether a pool whose decode actors have free_kv of kv KV (blocks or tokens, as last
        known; kv 0: not known yet) may overflow a request its prefill actors refused."""
        return not kv or free_kv >= self.decode_headroom * kv

    def candidates(self, priority: int, hosts: Sequence[Host[C]],
                   queue: Callable[[C], tuple[int, int]] = reported_queue) -> list[tuple[Host[C], C]]:
        """The actors to offer the request to, in order, each with its host. priority: the
        request's scenario's. queue: as in ForwardOnRejection.prefill_order."""
        found = []
        for host in sorted((h for h in hosts if h.priority <= priority), key=lambda h: h.priority):
            members = sorted(host.members, key=queue)
            found += [(host, m) for m in members[min(count_idle(members, queue), self.keep_idle):]]
        return sorted(found, key=lambda hm: (hm[0].priority, queue(hm[1])))[:self.max_offers]

    def budget_s(self, ttft_budget_s: float | None, host: Host[C], member: C,
                 queue: Callable[[C], tuple[int, int]] = reported_queue) -> float:
        """The TTFT budget an offer to the host's actor `member` names: the request's, within the
        host's share unless the actor is idle and the host keeps `spare_idle` others idle (host.members
        must hold at least its spare_idle + 1 least queued actors for them to be counted)."""
        share = self.host_share * host.ttft_s
        spare = count_idle(host.members, queue) > self.spare_idle
        if ttft_budget_s is not None and queue(member)[0] == 0 and spare:
            return ttft_budget_s
        return share if ttft_budget_s is None else min(ttft_budget_s, share)

    def takes(self, reply: OfferReply, budget_s: float) -> bool:
        """Whether the host actor's answer to an offer of `budget_s` places the request there."""
        return reply.accept and reply.predicted_ttft_s <= budget_s
