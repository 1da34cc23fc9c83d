"""The simulator overflows refused requests to another scenario's prefill actors as live dispatch
does (mesh.routing.CrossScenarioOverflow): the same request sequence, all of scenario "a", runs
through the live `mesh.dispatch.Dispatcher` (with scenario "b"'s pool as its neighbour) and
through the simulator, and the (request, actor, placed) sequence of offers, those to "b"'s
actors included, must be the same. As in test_offer_order, the sequence arrives at one instant
and every request is placed on its first pass, in "a" or in "b", so no side pauses."""
from __future__ import annotations

import numpy as np

from mesh.dispatch import Dispatcher
from mesh.routing import CrossScenarioOverflow, ForwardOnRejection, Neighbour
from simtests.cluster import Variant
from simtests.sim import Simulator
from simtests.workload import Workload
from tests.simtests.support import profile, scenario
from tests.simtests.stand_ins import (ADMISSION, DEADLINE_S, RATE, TTFT_S, DecodeStandIn, PrefillStandIn,
                                      StandInPool, dispatched_offers)
from tests.support.clock import FakeClock

HOME, HOST = 2, 3  # prefill actors of "a" and of "b"
POLICY = CrossScenarioOverflow(max_offers=2, host_share=1.0)


def live_offers(prompts: list[int]) -> list[tuple[int, int, bool]]:
    home = [PrefillStandIn(f"a{k}") for k in range(HOME)]
    host = [PrefillStandIn(f"b{k}") for k in range(HOST)]
    neighbours = [Neighbour("b", 0, TTFT_S, StandInPool([*host, DecodeStandIn("bd")]))]
    dispatcher = Dispatcher(StandInPool([*home, DecodeStandIn("ad")]), ForwardOnRejection(), clock=FakeClock(),
                            overflow=POLICY, neighbours=lambda: neighbours)
    # the simulator numbers each scenario's prefill actors, then its decode actor
    index = {a.actor_id: k for k, a in enumerate(home)} | {a.actor_id: HOME + 1 + k for k, a in enumerate(host)}
    return dispatched_offers(dispatcher, prompts, index)


def simulated_offers(make_cluster, prompts: list[int]) -> tuple[list[tuple[int, int, bool]], list[int]]:
    cluster = make_cluster(scenario("a", p=HOME, d=1, ttft=TTFT_S), scenario("b", p=HOST, d=1, ttft=TTFT_S),
                           model=profile(prefill=(0.0, 1 / RATE, 0.0), max_batch_tokens=10**6))
    offers = []
    sim = Simulator(cluster, Variant(controller=False, admission_timeout_s=DEADLINE_S), ADMISSION,
                    ForwardOnRejection(), offer_log=offers, overflow=POLICY)
    for a in sim.actors:  # measured already, as the stand-ins' is
        a.rate = RATE
    n = len(prompts)
    sim.run(Workload(np.zeros(n), np.array(prompts), np.full(n, 2), np.zeros(n, dtype=np.int64), "sequence"))
    return offers, sim.overflowed


def test_live_dispatch_and_the_simulator_overflow_to_the_same_actors(make_cluster):
    prompts = np.random.default_rng(1).integers(500, 3500, 12).tolist()
    live = live_offers(prompts)
    simulated, overflowed = simulated_offers(make_cluster, prompts)
    assert simulated == live
    # the sequence crosses every branch: "a" takes requests, refuses a whole pass, "b" takes the
    # refused ones, and one of "b"'s actors turns one down (its queue would pass "b"'s TTFT)
    host_ids = range(HOME + 1, HOME + 1 + HOST)
    placed = {rid: actor for rid, actor, ok in live if ok}
    assert set(placed) == set(range(len(prompts)))
    assert sum(actor in host_ids for actor in placed.values()) >= 3
    assert sum(actor < HOME for actor in placed.values()) >= 3
    assert any(actor in host_ids and not ok for _, actor, ok in live)
    assert [rid for rid, pool in enumerate(overflowed) if pool >= 0] == [
        rid for rid, actor in placed.items() if actor in host_ids]


def _three_at_once(make_cluster, policy, a=None, b=None, capacity=10**9):
    """Three 4000-token prompts of "a" at once: "a"'s one actor takes the first and refuses the others."""
    cluster = make_cluster(scenario("a", p=1, d=1, ttft=TTFT_S, **(a or {})),
                           scenario("b", p=2, d=1, ttft=TTFT_S, **(b or {})),
                           model=profile(prefill=(0.0, 1 / RATE, 0.0), max_batch_tokens=10**6, capacity=capacity))
    sim = Simulator(cluster, Variant(controller=False, admission_timeout_s=0.1), ADMISSION, overflow=policy)
    for actor in sim.actors:
        actor.rate = RATE
    run = sim.run(Workload(np.zeros(3), np.full(3, 4000), np.full(3, 2), np.zeros(3, dtype=np.int64), "sequence"))
    return run.stats()[0].rejected, sim.overflowed


def test_without_the_policy_a_refused_request_stays_in_its_pool(make_cluster):
    assert _three_at_once(make_cluster, None) == (2, [-1, -1, -1])
    assert _three_at_once(make_cluster, POLICY) == (0, [-1, 1, 1])


def test_a_scenario_with_overflow_off_neither_sends_nor_hosts(make_cluster):
    assert _three_at_once(make_cluster, POLICY, a={"overflow": False}) == (2, [-1, -1, -1])
    assert _three_at_once(make_cluster, POLICY, b={"overflow": False}) == (2, [-1, -1, -1])


def test_a_pool_whose_decode_kv_is_nearly_full_refuses_instead_of_overflowing(make_cluster):
    # 9000 tokens of decode KV: with two requests' leases (4002 each) 11% is free, under the 20% headroom
    assert _three_at_once(make_cluster, POLICY, capacity=9000) == (2, [-1, -1, -1])
    assert _three_at_once(make_cluster, POLICY, capacity=20000) == (0, [-1, 1, 1])


def _long_guest(make_cluster, host_actors: int):
    """Two prompts of "a" (TTFT 12 s) at once, its one actor busy with the first for 11 s (the
    second would come at 13 s there): the second's 2 s prefill is past host "b"'s 1 s TTFT
    target; where "b" prefilled it (-1: nowhere)."""
    cluster = make_cluster(scenario("a", p=1, d=1, ttft=12.0), scenario("b", p=host_actors, d=1, ttft=1.0),
                           model=profile(prefill=(0.0, 1 / RATE, 0.0), max_batch_tokens=10**6))
    sim = Simulator(cluster, Variant(controller=False, admission_timeout_s=5.0), ADMISSION,
                    overflow=CrossScenarioOverflow(spare_idle=2))
    for actor in sim.actors:
        actor.rate = RATE
    sim.run(Workload(np.zeros(2), np.array([110_000, 20_000]), np.full(2, 2), np.zeros(2, dtype=np.int64),
                     "sequence"))
    return sim.overflowed[1]


def test_an_idle_host_actor_takes_a_prompt_past_the_hosts_target_while_two_others_stay_idle(make_cluster):
    assert _long_guest(make_cluster, 3) == 1
    assert _long_guest(make_cluster, 2) == -1  # it would leave the host one idle actor
