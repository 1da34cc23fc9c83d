"""The discrete-event simulator: a request's path through a modelled pdmesh cluster.

The policies are the live ones: prefill admission is `mesh.admission.PrefillAdmission`,
the order of offers and the forwarding limits (offers per request, pause between passes)
are `mesh.routing.ForwardOnRejection`, called as `mesh.dispatch` calls them, the ratio
controller runs in the live control round (`scenarios.control_round`, see `simtests.control`), the
decode actor that reserves a request's KV is the router's too (`decode_order`, see
`simtests.decode_placement`). Actors are modelled (`simtests.actors`), their times from
the performance model.

Speed: arrivals are read in order from the workload rather than pushed on the heap;
the heap holds only what actors and timers schedule; per-request state lives in flat
lists indexed by request id; decode costs one event per join and finish (epochs).
"""
from __future__ import annotations

import heapq
import math
import time
from operator import attrgetter

from gateway.observe import LoadWindow
from mesh.admission import Offer, PrefillAdmission, PrefillLoad
from mesh.routing import CrossScenarioOverflow, ForwardOnRejection, Host
from mesh.roles import Role
from simtests.actors import Actor
from simtests.cluster import Cluster, Variant
from simtests.control import SimControl
from simtests.decode_placement import DecodePlacement
from simtests.pools import SimPool
from simtests.results import ACTIVE, DONE, REJECTED, Run
from simtests.workload import Workload

# what the router orders prefill actors by; ties go to the first to join, as in a live pool's member order
_queue = attrgetter("queued_requests", "queued_tokens", "joined")

# event kinds
PREFILL_DONE, TRANSFER_DONE, DECODE_NEXT, RETRY, EXPIRE, CONTROL, REPORT, STARTED = range(8)


class Simulator:
    def __init__(self, cluster: Cluster, variant: Variant = Variant(),
                 admission: PrefillAdmission = PrefillAdmission(),
                 forwarding: ForwardOnRejection = ForwardOnRejection(),
                 offer_log: list[tuple[int, int, bool]] | None = None,
                 overflow: CrossScenarioOverflow | None = CrossScenarioOverflow()):
        """offer_log: where to note every offer answered, as (request, actor, accepted): what
        live dispatch reports as prefill_rejected / prefill_accepted events. overflow: offers of
        refused requests to other scenarios' pools (None: none), for the scenarios whose spec allows it."""
        self.cluster, self.variant = cluster, variant
        self.admission, self.forwarding, self.overflow = admission, forwarding, overflow
        self.offer_log = offer_log
        specs = cluster.specs
        self.names = [s.name for s in specs]
        self.aggregated = variant.serving == "aggregated"
        self.contiguous = variant.transfer == "contiguous"
        self.central = variant.placement == "central"
        self.prefix_aware = variant.prefix == "prefix-aware"
        if variant.pools == "mixed":
            models = {s.model for s in specs}
            if len(models) > 1:
                raise ValueError(f"one mixed pool needs one model; the scenarios serve {sorted(models)}")
            self.pools = [SimPool(0, "mixed")]
            self.pool_of = [0] * len(specs)
        else:
            self.pools = [SimPool(i, s.name) for i, s in enumerate(specs)]
            self.pool_of = list(range(len(specs)))
        # per scenario, the other scenarios' pools its refused requests may overflow to
        self.hosts = [[k for k, o in enumerate(specs) if k != i and o.model == s.model and o.overflow]
                      if s.overflow and overflow and variant.pools == "scenario" and not self.aggregated else []
                      for i, s in enumerate(specs)]
        self.ttft_target = [s.slo.ttft_s for s in specs]
        self.tpot_target = [s.slo.tpot_s for s in specs]
        self.now = 0.0
        self.joins = 0  # actors that joined a pool's serving ones so far
        self.actors: list[Actor] = []
        self.decode_placement = DecodePlacement(self)  # which decode actor reserves a request's KV
        prefill_left = variant.mixed_prefill if variant.pools == "mixed" else None
        for k, s in enumerate(specs):
            pool = self.pools[self.pool_of[k]]
            model = cluster.models[s.name]
            roles = ([Role.BOTH] * (s.prefill + s.decode) if self.aggregated
                     else [Role.PREFILL] * s.prefill + [Role.DECODE] * s.decode)
            if prefill_left is not None and not self.aggregated:  # the mixed pool's split, not the specs'
                p = min(prefill_left, len(roles))
                roles, prefill_left = [Role.PREFILL] * p + [Role.DECODE] * (len(roles) - p), prefill_left - p
            for role in roles:  # an aggregated actor runs on the prefill hardware
                hw = s.hardware[Role.PREFILL if role is Role.BOTH else role]
                a = Actor(len(self.actors), role, pool.index, model, device=hw.device)
                self.actors.append(a)
                pool.members.add(a.id)
                self._enter(a)
        self.heap: list[tuple] = []
        self.seq = 0
        self.events = 0
        self.control: SimControl | None = None  # set by run() when the controller is on
        self.window: LoadWindow | None = None  # the controller's: what the live gateway measures

    # -- the loop ---------------------------------------------------------------------------
    def run(self, w: Workload) -> "Run":
        """Replays the workload to the last request's end; returns the raw run. Once per simulator:
        the actors keep their state."""
        n = len(w)
        self.arrival = w.arrival_s.tolist()
        self.prompt = w.prompt.tolist()
        self.output = w.output.tolist()
        self.scen = w.scenario.tolist()
        self.deadline = [0.0] * n
        self.t_first = [math.nan] * n
        self.t_done = [math.nan] * n
        self.xfer = [0.0] * n
        self.decode_of = [-1] * n
        self.offers = [0] * n
        self.hit = [0] * n  # prompt tokens found in the prefill actor's prefix cache
        self.kv_short = [False] * n  # found no decode KV free on arrival
        self.overflowed = [-1] * n  # the pool of another scenario whose prefill actor took it
        self.prefix_of = w.prefix_ids if self.variant.prefix != "off" else None
        self.block_tokens = w.block_tokens
        self.state = [ACTIVE] * n
        self.active = 0
        self.next_arrival = 0
        if self.variant.controller and self.variant.pools == "scenario" and not self.aggregated:
            self.control = SimControl(self)
            self.window = self.control.window
            self._push(self.cluster.settings.interval_s, CONTROL, 0, 0)
        if self.central:
            for pool in self.pools:
                pool.report(self.actors)
            self._push(self.variant.report_interval_s, REPORT, 0, 0)
        handlers = (self._prefill_done, self._transfer_done, self._decode_next, self._retry, self._expire,
                    self._control, self._report, self._started)
        arrival, heap, pop = self.arrival, self.heap, heapq.heappop
        start, cpu = time.perf_counter(), time.process_time()
        events = 0
        i = 0
        while True:
            if i < n and (not heap or arrival[i] <= heap[0][0]):
                self.now = arrival[i]
                self.next_arrival = i = i + 1
                self._arrive(i - 1)
            elif heap:
                t, _, kind, x, y = pop(heap)
                self.now = t
                handlers[kind](x, y)
            else:
                break
            events += 1
        self.events = events
        for pool in self.pools:  # only expired requests are left there (each waiting one has an EXPIRE)
            pool.waiting.clear()
        return Run(self, w, time.perf_counter() - start, time.process_time() - cpu)

    def _push(self, t: float, kind: int, x: int, y: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, x, y))

    def _more_to_come(self) -> bool:
        return self.next_arrival < len(self.arrival) or self.active > 0

    # -- a request's path -----------------------------------------------------------------
    def _arrive(self, rid: int) -> None:
        self.active += 1
        self.deadline[rid] = self.now + self.variant.admission_timeout_s
        if self.window:
            self.window.arrived(self.names[self.scen[rid]], self.prompt[rid])
        self._place(self.pools[self.pool_of[self.scen[rid]]], rid)

    def _place(self, pool: SimPool, rid: int) -> None:
        """Reserve decode KV (step 2 of the design), then find a prefill actor (step 3)."""
        if not self.aggregated and self.decode_of[rid] < 0 and not self.decode_placement.reserve(pool, rid):
            self.kv_short[rid] = True
            pool.waiting.append(rid)
            self._push(self.deadline[rid], EXPIRE, rid, 0)
            return
        self.find_prefill(pool, rid)

    def find_prefill(self, pool: SimPool, rid: int) -> None:
        """A prefill actor for rid, its decode KV reserved: the central scheduler's choice, or
        forward on rejection."""
        if self.central:
            self._central(pool, rid)
        else:
            self._offer(pool, rid)

    def _offer(self, pool: SimPool, rid: int) -> None:
        """Forward on rejection as live dispatch does it (`mesh.dispatch`): one pass over the pool in
        the router's order (prefix holders, then idle-first), each actor answering from its own
        state; a whole pass rejected: pause and try again."""
        fw, decide, actors = self.forwarding, self.admission.decide, self.actors
        now, p = self.now, self.prompt[rid]
        offers, time_left = self.offers[rid], self.deadline[rid] - now
        budget = self.ttft_target[self.scen[rid]] - (now - self.arrival[rid])
        need = p + self.output[rid] if self.aggregated else 0  # aggregated: KV on the prefill actor itself
        cached = self._cached_tokens(pool, rid)
        # at most max_forwards offers: only the least queued and the prefix holders can be offered
        members = pool.least_queued(actors, fw.max_forwards - offers)
        members += [actors[aid] for aid in cached if actors[aid] not in members]
        retry = math.inf
        for a in fw.prefill_order(members, cached, _queue):
            if not fw.may_offer(offers, time_left):
                break
            offers += 1
            if a.free < need:
                continue
            d = decide(PrefillLoad(a.queued_tokens, a.queued_requests, a.rate),
                       Offer(p, budget, cached_tokens=cached.get(a.id, 0)))  # no request end here
            if self.offer_log is not None:
                self.offer_log.append((rid, a.id, d.accept))
            if d.accept:
                self._accept(pool, a, rid)
                return
            retry = min(retry, d.retry_after_s)
        self.offers[rid] = offers
        if self.hosts[self.scen[rid]] and self._overflow(rid, budget):
            return
        if fw.may_offer(offers, time_left):
            self._push(now + fw.pause_s(None if retry == math.inf else retry, time_left), RETRY, rid, 0)
        else:
            self._reject(rid)

    def _overflow(self, rid: int, budget: float) -> bool:
        """rid's own pool refused it (a whole pass): offer it to prefill actors of the other scenarios'
        pools (`mesh.routing.CrossScenarioOverflow`, as `mesh.dispatch` does); its decode
        reservation stays. Whether one took it."""
        ov, actors, specs, k = self.overflow, self.actors, self.cluster.specs, self.scen[rid]
        decode = [actors[aid] for aid in self.pools[self.pool_of[k]].decode]
        if not ov.due(sum(a.free for a in decode), sum(a.capacity for a in decode)):
            return False
        hosts = [Host(specs[h].name, specs[h].priority, specs[h].slo.ttft_s,
                      self.pools[h].least_queued(actors, ov.max_offers + ov.keep_idle + ov.spare_idle))
                 for h in self.hosts[k]]
        for host, a in ov.candidates(specs[k].priority, hosts, _queue):
            budget_s = ov.budget_s(budget, host, a, _queue)
            d = self.admission.decide(PrefillLoad(a.queued_tokens, a.queued_requests, a.rate),
                                      Offer(self.prompt[rid], budget_s))
            taken = ov.takes(d, budget_s)
            if self.offer_log is not None:
                self.offer_log.append((rid, a.id, taken))
            if taken:
                self.overflowed[rid] = a.pool
                self._accept(self.pools[a.pool], a, rid)
                return True
        return False

    def _cached_tokens(self, pool: SimPool, rid: int) -> dict[int, int]:
        """The prompt tokens each actor holding the longest prefix of rid's prompt would skip (the
        live dispatcher's prefix index, exact here); the offer names them (mesh.admission)."""
        if not (self.prefix_aware and self.prefix_of):
            return {}
        blocks, holders = pool.longest_prefix_holders(self.prefix_of(rid))
        tokens = min(blocks * self.block_tokens, self.prompt[rid] - 1)  # the last token is always computed
        actors = self.actors
        return {aid: tokens for aid in holders if not actors[aid].draining and actors[aid].pool == pool.index}

    def _central(self, pool: SimPool, rid: int) -> None:
        """The baseline: the actor with the least queue by the last report (plus what was
        placed since); it always takes the request."""
        a = pool.least_reported(self.actors, self.prompt[rid])
        if a is None:  # no prefill actor at the last report: wait for the next
            self._push(self.now + self.variant.report_interval_s, RETRY, rid, 0)
        else:
            self._accept(pool, a, rid)

    def _accept(self, pool: SimPool, a: Actor, rid: int) -> None:
        if self.aggregated:
            need = self.prompt[rid] + self.output[rid]
            a.reserved += need
            self.decode_of[rid] = a.id
        a.queue.append(rid)
        a.queued_tokens += self.prompt[rid]
        a.queued_requests += 1
        pool.note_queue(a, self.actors)
        if not a.busy:
            self._start_prefill(a)

    def _start_prefill(self, a: Actor) -> None:
        tokens, seconds = a.take_batch(self.prompt, self._cached if self.prefix_of else None)
        if a.role is Role.BOTH:  # the prompt shares steps with the decode batch: both slow down
            a.advance(self.now)
            seconds = a.chunk(tokens, seconds, self.variant.chunk_tokens)
            self._schedule_decode(a)
        a.start_prefill(tokens, seconds)
        self._push(self.now + seconds, PREFILL_DONE, a.id, 0)

    def _prefill_done(self, aid: int, _: int) -> None:
        a, now = self.actors[aid], self.now
        if a.role is Role.BOTH:
            a.advance(now)  # while still busy: the shared time was the prefill's
        batch, a.batch, a.busy = a.batch, [], False
        prompt, t_first = self.prompt, self.t_first
        for rid in batch:
            t_first[rid] = now  # the first token is sampled by prefill and streamed at once
            a.queued_tokens -= prompt[rid]
        a.queued_requests -= len(batch)
        self.pools[a.pool].note_queue(a, self.actors)
        if a.role is Role.BOTH:
            a.unchunk()
            for rid in batch:
                self._join(a, rid)
            self._schedule_decode(a)
        else:
            self._send(a, batch)
        if a.queue:
            self._start_prefill(a)
        elif a.draining:
            self._maybe_drained(a)

    def _cached(self, a: Actor, rid: int) -> int:
        """The prompt tokens a's prefix cache holds for rid (then it holds all of rid's prompt)."""
        blocks = self.pools[a.pool].cache(a, self.prefix_of(rid), self.block_tokens)
        hit = min(blocks * self.block_tokens, self.prompt[rid] - 1)  # the last token is always computed
        self.hit[rid] = hit
        return hit

    def _send(self, a: Actor, batch: list[int]) -> None:
        """KV to each request's decode actor, one after another on this actor's link."""
        model, now = a.model, self.now
        for rid in batch:
            seconds = model.prompt_transfer_s(self.prompt[rid], self.contiguous)
            a.link_free = max(now, a.link_free) + seconds
            self.xfer[rid] = seconds
            self._push(a.link_free, TRANSFER_DONE, rid, 0)

    def _transfer_done(self, rid: int, _: int) -> None:
        a = self.actors[self.decode_of[rid]]
        a.advance(self.now)
        self._join(a, rid)
        self._schedule_decode(a)

    def _join(self, a: Actor, rid: int) -> None:
        if self.output[rid] <= 1:  # the prefill's token was the only one
            self._finish(a, rid)
            self._released(a)
        else:
            a.join(rid, self.prompt[rid], self.output[rid])

    def _schedule_decode(self, a: Actor) -> None:
        t = a.next_finish_s()
        if t < math.inf:
            self._push(t, DECODE_NEXT, a.id, a.version)

    def _decode_next(self, aid: int, version: int) -> None:
        a = self.actors[aid]
        if version != a.version:  # the batch changed since: a later event stands for it
            return
        a.advance(self.now)
        for rid in a.finished(self.prompt, self.output):
            self._finish(a, rid)
        self._schedule_decode(a)
        self._released(a)

    def _finish(self, a: Actor, rid: int) -> None:
        self.t_done[rid] = self.now
        self.state[rid] = DONE
        a.reserved -= self.prompt[rid] + self.output[rid]
        self.active -= 1
        if self.window:
            out = self.output[rid]
            self.window.ended(self.names[self.scen[rid]], self.t_first[rid] - self.arrival[rid],
                              (self.now - self.t_first[rid]) / (out - 1) if out > 1 else None, out,
                              self.kv_short[rid])

    def _released(self, a: Actor) -> None:
        """a's KV was freed: index it again, admit waiting requests, end its drain if empty."""
        if a.draining:
            self._maybe_drained(a)
        elif a.role is Role.DECODE:
            pool = self.pools[a.pool]
            pool.note_kv(a, self.actors)
            if pool.waiting:
                self.decode_placement.admit_waiting(pool)

    def _expire(self, rid: int, _: int) -> None:
        """The admission window closed on a request still waiting for decode KV."""
        if self.state[rid] == ACTIVE and self.decode_of[rid] < 0:
            self._reject(rid)

    def _retry(self, rid: int, _: int) -> None:
        self._place(self.pools[self.pool_of[self.scen[rid]]], rid)

    def _reject(self, rid: int) -> None:
        """RESOURCE_EXHAUSTED to the client; its decode reservation is freed."""
        self.state[rid] = REJECTED
        self.t_done[rid] = self.now
        self.active -= 1
        d = self.decode_of[rid]
        if d >= 0:
            a = self.actors[d]
            a.reserved -= self.prompt[rid] + self.output[rid]
            self._released(a)
        if self.window:  # no first token: a TTFT miss, as the live gateway counts a refusal
            self.window.ended(self.names[self.scen[rid]], None, None, 0, self.kv_short[rid])

    # -- timers ---------------------------------------------------------------------------
    def _control(self, _: int, __: int) -> None:
        self.control.tick()
        if self._more_to_come():
            self._push(self.now + self.cluster.settings.interval_s, CONTROL, 0, 0)

    def _report(self, _: int, __: int) -> None:
        for pool in self.pools:
            pool.report(self.actors)
        if self._more_to_come():
            self._push(self.now + self.variant.report_interval_s, REPORT, 0, 0)

    # -- moving actors (the controller's connector calls these) ------------------------------
    def move(self, a: Actor, role: Role, pool: int | None) -> None:
        """Drain a, then switch it to `role` in `pool` (None: stop it): it takes no new work from now."""
        self._leave(a)
        self.pools[a.pool].members.discard(a.id)
        if pool is not None:
            self.pools[pool].members.add(a.id)
        a.next_role, a.next_pool, a.draining = role, pool, True
        self._maybe_drained(a)

    def start_actor(self, pool: int, role: Role, start_s: float) -> None:
        """A new actor of `role` in `pool` (the scenario's hardware for it), serving after
        start_s; until then a member that takes no work, as a live pool's starting actor."""
        spec = self.cluster.specs[pool]
        a = Actor(len(self.actors), role, pool, self.cluster.models[spec.name], self.now,
                  device=spec.hardware[role].device)
        a.draining = True
        self.actors.append(a)
        self.pools[pool].members.add(a.id)
        self._push(self.now + start_s, STARTED, a.id, 0)

    def _started(self, aid: int, _: int) -> None:
        a = self.actors[aid]
        a.draining = False
        self._enter(a)

    def _leave(self, a: Actor) -> None:
        pool = self.pools[a.pool]
        if a.role is Role.DECODE:
            pool.decode.remove(a.id)
            a.kv_version += 1  # its entries in the free-KV heap are stale from now
        else:
            pool.prefill.remove(a.id)

    def _maybe_drained(self, a: Actor) -> None:
        if a.draining and a.empty:
            self.pools[a.pool].forget(a)  # its KV pool serves another role or scenario from now
            a.switch(self.now)
            if a.pool is not None:
                self._enter(a)

    def _enter(self, a: Actor) -> None:
        pool = self.pools[a.pool]
        self.joins += 1
        a.joined = self.joins
        if a.role is Role.DECODE:
            pool.decode.append(a.id)
            pool.note_kv(a, self.actors)
            if pool.waiting:
                self.decode_placement.admit_waiting(pool)
        else:
            pool.prefill.append(a.id)
            pool.note_queue(a, self.actors)
