"""Modelled actors: what one prefill, decode or aggregated actor is doing, and how long it
takes, from the performance model.

Decode is modelled by epochs, not steps: between two changes of its batch (a sequence
joins or finishes) a decode actor's step time grows linearly with the batch's context
(a + b*B + c*C, C rising by B per step), so the time of k steps has a closed form and
its inverse too. The simulator then needs one event per join and finish instead of
one per step (millions of steps an hour per actor at cluster scale). Sequences join
at fractional step positions: at most one step early, which the TPOT figures absorb.
"""
from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from typing import Callable

from mesh.roles import Role
from scenarios.perf_model import PerfModel


class Actor:
    __slots__ = (
        "id", "role", "device", "pool", "draining", "next_role", "next_pool", "joined", "model",
        # prefill
        "queue", "queued_tokens", "queued_requests", "batch", "busy", "rate", "link_free", "prefill_busy_s", "cache",
        # decode
        "t0", "steps", "size", "ctx", "members", "reserved", "capacity", "kv_version", "version",
        "decode_busy_s", "da", "db", "dc",
        # time spent in each role, for utilisation
        "role_since", "role_s",
        # when it was started and stopped (autoscaling), for actor-hours
        "born", "retired_at",
    )

    def __init__(self, aid: int, role: Role, pool: int, model: PerfModel, now: float = 0.0, device: str = ""):
        """device: the kind it runs on (mesh.hardware.Hardware.device): the role rule keeps it on its
        roles' hardware."""
        self.id, self.role, self.pool, self.device = aid, role, pool, device
        self.draining, self.next_role, self.next_pool = False, role, pool
        self.joined = 0  # when it last joined a pool's serving actors (the simulator counts): ties in offer order
        self.model = model
        self.queue: deque[int] = deque()
        self.queued_tokens = self.queued_requests = 0
        self.batch: list[int] = []
        self.busy = False
        self.rate = 0.0  # measured prefill tokens/s, smoothed like the live actor's; 0 until measured
        self.link_free = 0.0  # when this actor's NIC finishes the transfers queued on it
        self.prefill_busy_s = self.decode_busy_s = 0.0
        self.cache: OrderedDict[int, None] = OrderedDict()  # prefix block ids held, least recent first
        self.t0, self.steps, self.size, self.ctx = now, 0.0, 0, 0.0
        self.members: list[tuple[float, int]] = []  # (step at which it finishes, request)
        self.reserved = 0  # KV tokens reserved by leases
        self.capacity = model.kv_capacity_tokens
        self.kv_version = self.version = 0  # bumped when free KV / the batch changes: stale events skip
        self.da, self.db, self.dc = model.decode.coef
        self.role_since, self.role_s = now, dict.fromkeys(Role, 0.0)
        self.born, self.retired_at = now, None

    @property
    def actor_id(self) -> int:  # what the router (mesh.routing) knows an actor by
        return self.id

    @property
    def free(self) -> int:
        return self.capacity - self.reserved

    @property
    def idle(self) -> bool:
        return not self.busy and not self.queue

    @property
    def empty(self) -> bool:
        """Nothing queued, running or reserved: a drain is complete."""
        return self.idle and not self.members and not self.reserved

    def load(self) -> int:
        return self.queued_requests + self.size

    def switch(self, now: float) -> None:
        """End a drain: take the new role and pool (same weights, no reload), or stop (no pool)."""
        self.role_s[self.role] += now - self.role_since
        self.role, self.pool, self.role_since, self.draining = self.next_role, self.next_pool, now, False
        if self.pool is None:  # stopped: takes no work, as while draining (the pools' indexes skip it)
            self.retired_at, self.draining = now, True

    def alive_s(self, end: float) -> float:
        """Seconds it existed up to `end`: what actor-hours count."""
        return (self.retired_at if self.retired_at is not None else end) - self.born

    # -- prefill -------------------------------------------------------------------------
    def take_batch(self, prompt: list[int], cached: Callable[["Actor", int], int] | None) -> tuple[int, float]:
        """Moves queued requests into a batch up to the token budget (at least one); returns
        its tokens and how long prefilling them alone takes. cached(actor, request): the
        prompt tokens this actor's prefix cache already holds; only the rest is computed,
        attending to the whole prompt."""
        budget, tokens, computed, sumsq = self.model.max_batch_tokens, 0, 0, 0
        q, batch = self.queue, self.batch
        while q and (not batch or tokens + prompt[q[0]] <= budget):
            rid = q.popleft()
            batch.append(rid)
            p = prompt[rid]
            hit = cached(self, rid) if cached else 0
            tokens += p
            computed += p - hit
            sumsq += p * p - hit * hit
        return tokens, max(self.model.prefill_s(computed, sumsq), 1e-9)

    def start_prefill(self, tokens: int, seconds: float) -> None:
        measured = tokens / seconds
        self.rate = measured if self.rate == 0 else 0.8 * self.rate + 0.2 * measured
        self.busy = True
        self.prefill_busy_s += seconds

    def chunk(self, tokens: int, alone_s: float, chunk_tokens: int) -> float:
        """Aggregated actor, chunked prefill (vLLM, SGLang): every step carries up to
        `chunk_tokens` prompt tokens beside the decode batch, so the prompt takes
        ceil(tokens / chunk_tokens) steps and each decode step grows by its share of the
        prefill until `unchunk`. Call after `advance(now)`; returns the prefill's duration."""
        steps = math.ceil(tokens / chunk_tokens)
        decode_step = self.da + self.db * self.size + self.dc * self.ctx if self.size else 0.0
        self.da += alone_s / steps
        self.version += 1
        return alone_s + steps * decode_step

    def unchunk(self) -> None:
        self.da = self.model.decode.coef[0]
        self.version += 1

    # -- decode, by epochs -----------------------------------------------------------------
    def advance(self, now: float) -> None:
        """Moves the batch's step count and context to `now`."""
        dt = now - self.t0
        if dt > 0 and self.size:
            alpha = self.da + self.db * self.size + self.dc * self.ctx
            q = self.dc * self.size
            # k with alpha*k + q*k^2/2 = dt, in the form that does not cancel when q*dt is small
            k = 2 * dt / (alpha + math.sqrt(alpha * alpha + 2 * q * dt))
            self.steps += k
            self.ctx += self.size * k
            if not self.busy:  # aggregated: time shared with a prefill counts as prefill's
                self.decode_busy_s += dt
        self.t0 = now

    def next_finish_s(self) -> float:
        """When the first member finishes, at the current batch; inf when none."""
        if not self.members:
            return math.inf
        k = self.members[0][0] - self.steps
        if k <= 0:
            return self.t0
        alpha = self.da + self.db * self.size + self.dc * self.ctx
        return self.t0 + k * (alpha + 0.5 * self.dc * self.size * k)

    def step_s_at(self, now: float, dt: float, tokens: int, prompt: list[int], output: list[int]) -> float:
        """The step time predicted `dt` after `now` once a sequence of `tokens` context has joined:
        the members done by then (at the current step time) have left, the others have grown, and the
        KV reserved for requests still in prefill has joined."""
        self.advance(now)
        k = dt / (self.da + self.db * self.size + self.dc * self.ctx) if self.size else 0.0
        held = stay = 0
        ctx = float(tokens)
        for end, rid in self.members:
            held += prompt[rid] + output[rid]
            if end > self.steps + k:
                stay += 1
                ctx += prompt[rid] + output[rid] - (end - self.steps) + k
        return self.da + self.db * (stay + 1) + self.dc * (ctx + self.reserved - held)

    def join(self, rid: int, prompt: int, output: int) -> None:
        """A sequence enters the batch after its first token (sampled by prefill): output-1 steps."""
        heapq.heappush(self.members, (self.steps + output - 1, rid))
        self.size += 1
        self.ctx += prompt + 1
        self.version += 1

    def finished(self, prompt: list[int], output: list[int]) -> list[int]:
        """Pops the members whose last step is done (called at the first one's finish time,
        so that one is done whatever the rounding); their context leaves the batch."""
        members = self.members
        self.steps = max(self.steps, members[0][0])
        done = []
        while members and members[0][0] <= self.steps + 1e-6:
            rid = heapq.heappop(members)[1]
            done.append(rid)
            self.ctx -= prompt[rid] + output[rid]
        self.size -= len(done)
        self.version += 1
        if not self.size:
            self.ctx = 0.0  # drop accumulated rounding with the last sequence
        return done
