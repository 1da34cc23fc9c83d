"""Stand-in actors for comparing live dispatch's offers with the simulator's: each answers
offer, reserve, prefill and decode at once, each offer from `mesh.admission` on the actor's
queue, and an accepted prefill stays queued (none ends)."""
from __future__ import annotations

import asyncio

import numpy as np

from gateway.bench import InstantCall, InstantFeed, instant_commit, instant_lease, ready
from mesh.admission import Offer, PrefillAdmission, PrefillLoad
from mesh.api import ActorReport, ActorState, FirstToken, LoadReport, Role, SamplingParams
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from mesh.errors import MeshError
from mesh.serving_mode import Mode

RATE = 10_000.0  # prefill tokens/s of every actor, live and modelled
TTFT_S = 0.6  # the scenario's TTFT budget: 6000 tokens of queue and prompt
DEADLINE_S = 10.0
ADMISSION = PrefillAdmission()


async def _stream(*items):
    for item in items:
        yield ready(item)


class PrefillStandIn:
    """A prefill actor's calls, answered at once; an accepted prefill stays queued (none ends)."""

    def __init__(self, actor_id: str):
        self.actor_id, self.role = actor_id, Role.PREFILL
        self.queued_requests = self.queued_tokens = 0
        self.handle = self
        self.offer = InstantCall(self._offer)
        self.prefill = InstantCall(self._prefill)

    @property
    def info(self) -> ActorReport:  # the report live dispatch orders by, always up to date here
        return ActorReport(self.actor_id, "s", self.role, ActorState.SERVING, block_size=16,
                           load=LoadReport(self.queued_tokens, self.queued_requests))

    def _offer(self, prompt_tokens, ttft_budget_s, time_left_s, cached_tokens):
        return ready(ADMISSION.decide(PrefillLoad(self.queued_tokens, self.queued_requests, RATE),
                                      Offer(prompt_tokens, ttft_budget_s, time_left_s, cached_tokens)))

    def _prefill(self, request, lease):
        self.queued_requests += 1
        self.queued_tokens += len(request.prompt_token_ids)
        return _stream(FirstToken([7], "a", None, None), instant_commit())


class DecodeStandIn:
    def __init__(self, actor_id: str):
        self.actor_id, self.role = actor_id, Role.DECODE
        self.info = ActorReport(actor_id, "s", self.role, ActorState.SERVING, block_size=16,
                                load=LoadReport(free_blocks=10**6))
        self.handle = self
        self.reserve = InstantCall(lambda ids, align, sender_sizes=(1,): ready(instant_lease("l")))
        fed = InstantFeed(2)
        self.feed, self.decode = fed.feed, fed.decode
        self.release_lease = InstantCall(lambda lease_id: ready(True))


class StandInPool:
    mode = Mode.DISAGGREGATED  # the split path, as the simulator runs
    switching = False

    def __init__(self, members):
        self.members = members

    def by_role(self, role: Role) -> list:
        return [m for m in self.members if m.role is role]


def dispatched_offers(dispatcher: Dispatcher, prompts: list[int], index: dict[str, int], ttft_s: float = TTFT_S,
                      admission_s: float = DEADLINE_S) -> list[tuple[int, int, bool]]:
    """(request, actor index, accepted) of every offer live dispatch makes for the prompts, in
    order; a request out of offers is refused, as the simulator refuses it. Offers stop at
    admission_s (on the fake clock, from 0); the requests end at DEADLINE_S."""
    rng = np.random.default_rng(0)
    offers = []

    async def run():
        for rid, n in enumerate(prompts):
            events = []
            # random tokens: no prompt shares a prefix with another, as the simulator's have none
            req = Request(f"r{rid}", rng.integers(1, 30000, n).tolist(), SamplingParams(max_tokens=2),
                          deadline=DEADLINE_S, admission_deadline=admission_s, ttft_budget_s=ttft_s)
            try:
                async for _ in dispatcher.generate(req, events):
                    pass
            except MeshError as e:
                assert e.code == "resource_exhausted", e
            offers.extend((rid, index[e.attributes["actor"]], e.name == "prefill_accepted") for e in events
                          if e.name in ("prefill_accepted", "prefill_rejected"))

    asyncio.run(run())
    return offers
