"""The simulator offers requests to prefill actors in the same order as live dispatch.

One request sequence runs through the live `mesh.dispatch.Dispatcher` (stand-in actors that
answer offer, reserve, prefill and decode at once, each offer from `mesh.admission` on the
actor's queue) and through the simulator; the (request, actor, accepted) sequence of offers
must be the same. The sequence arrives at one instant, so no prefill ends while it is placed
and both sides see the same queues; its prompts are sized so that busy actors reject some
offers and the request is forwarded, but no pass over the whole pool is rejected (that would
pause, and time would pass differently on the two sides). With more actors than offers per
request, a request runs out of offers instead, and the simulator looks only at the least
queued actors of its pool (`simtests.pools.SimPool.least_queued`).
"""
from __future__ import annotations

import numpy as np
import pytest

from mesh.dispatch import Dispatcher
from mesh.routing import ForwardOnRejection
from simtests.cluster import Variant
from simtests.sim import Simulator
from simtests.workload import Workload
from tests.simtests.stand_ins import (ADMISSION, DEADLINE_S, RATE, TTFT_S, DecodeStandIn, PrefillStandIn, StandInPool,
                                      dispatched_offers)
from tests.simtests.support import profile, scenario
from tests.support.clock import FakeClock


def live_offers(prompts: list[int], actors: int, forwarding: ForwardOnRejection, ttft_s: float = TTFT_S,
                admission_s: float = DEADLINE_S) -> list[tuple[int, int, bool]]:
    prefill = [PrefillStandIn(f"p{k}") for k in range(actors)]
    dispatcher = Dispatcher(StandInPool([*prefill, DecodeStandIn("d0")]), forwarding, clock=FakeClock())
    index = {a.actor_id: k for k, a in enumerate(prefill)}  # the simulator numbers prefill actors first
    return dispatched_offers(dispatcher, prompts, index, ttft_s, admission_s)


def simulated_offers(make_cluster, prompts: list[int], actors: int, forwarding: ForwardOnRejection,
                     ttft_s: float = TTFT_S, admission_s: float = DEADLINE_S) -> list[tuple[int, int, bool]]:
    cluster = make_cluster(scenario(p=actors, d=1, ttft=ttft_s),
                           model=profile(prefill=(0.0, 1 / RATE, 0.0), max_batch_tokens=10**6))
    offers = []
    sim = Simulator(cluster, Variant(controller=False, admission_timeout_s=admission_s), ADMISSION, forwarding,
                    offer_log=offers)
    for a in sim.actors:  # measured already, as the stand-ins' is
        a.rate = RATE
    n = len(prompts)
    sim.run(Workload(np.zeros(n), np.array(prompts), np.full(n, 2), np.zeros(n, dtype=np.int64), "sequence"))
    return offers


@pytest.mark.parametrize("actors, max_forwards, seed, size", [
    (4, 8, 3, (500, 3000, 14)),  # forwarded until accepted, every request within its first pass
    (10, 3, 0, (1500, 5000, 30)),  # more actors than offers: some requests run out of offers
])
def test_live_dispatch_and_the_simulator_offer_in_the_same_order(make_cluster, actors, max_forwards, seed, size):
    forwarding = ForwardOnRejection(max_forwards=max_forwards)
    low, high, n = size
    prompts = np.random.default_rng(seed).integers(low, high, n).tolist()
    live = live_offers(prompts, actors, forwarding)
    assert simulated_offers(make_cluster, prompts, actors, forwarding) == live
    # the sequence crosses every branch of the order: idle actors first, busy ones forwarded to
    # by their queues, and rejections
    assert [rid for rid, _, ok in live[:actors]] == list(range(actors))
    assert sum(not ok for _, _, ok in live) >= 5
    assert len({a for rid, a, ok in live if ok and rid >= actors}) >= 2
    placed = {rid for rid, _, ok in live if ok}
    if actors <= max_forwards:
        assert placed == set(range(n))
    else:
        assert len(placed) < n


def test_an_actor_judges_an_offer_by_the_ttft_budget_not_by_how_long_offers_may_go_on(make_cluster):
    """A TTFT target of 3 s and 1 s of offers: a busy actor whose first token for the request
    would come at 2 s takes it, live and in the simulator. (Judged by the time left to offer, a
    scenario whose TTFT target is longer than the admission window, xlong's 12 s against 5 s,
    found only idle actors.)"""
    forwarding = ForwardOnRejection()
    prompts = [15_000, 5_000]  # 1.5 s of prefill queued on the one actor, then 0.5 s more
    live = live_offers(prompts, 1, forwarding, ttft_s=3.0, admission_s=1.0)
    assert live == [(0, 0, True), (1, 0, True)]
    assert simulated_offers(make_cluster, prompts, 1, forwarding, ttft_s=3.0, admission_s=1.0) == live
