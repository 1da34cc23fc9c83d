"""The simulator's bookkeeping and each variant the comparisons use, on small clusters."""
import numpy as np
import pytest

from scenarios.controller import Settings
from simtests.cluster import Variant
from simtests.results import DONE, REJECTED
from simtests.sim import Simulator
from simtests.workload import Mix, Workload, synthetic
from tests.simtests.support import profile, scenario


def run_and_check(cluster, variant, w):
    """Runs, then checks that every request ended and nothing is left queued or reserved."""
    sim = Simulator(cluster, variant)
    run = sim.run(w)
    assert set(np.unique(run.state)) <= {DONE, REJECTED}
    assert sim.active == 0 and not any(p.waiting for p in sim.pools)
    for a in sim.actors:
        assert a.reserved == 0 and not a.queue and not a.members and not a.busy and not a.draining
        assert a.queued_tokens == 0 and a.queued_requests == 0
    return run


MIXED_LOAD = [Mix(0, 20.0, 400, 60), Mix(1, 10.0, 2000, 20)]


@pytest.mark.parametrize("variant", [
    Variant(),
    Variant(pools="mixed", controller=False),
    Variant(placement="central"),
    Variant(transfer="block"),
    Variant(serving="aggregated"),
], ids=["pdmesh", "mixed", "central", "block", "aggregated"])
def test_every_variant_ends_every_request_and_frees_everything(make_cluster, variant):
    cluster = make_cluster(scenario("a", p=2, d=2, ttft=1.0, tpot=0.05), scenario("b", p=3, d=1, ttft=2.0),
                           model=profile(capacity=60_000), settings=Settings(interval_s=2, min_dwell_s=4))
    w = synthetic(MIXED_LOAD, duration_s=60, shape="bursty", period_s=20, seed=2)
    run = run_and_check(cluster, variant, w)
    assert run.stats()[-1].requests == len(w)


def test_runs_are_deterministic(make_cluster):
    cluster = make_cluster(scenario("a", p=2, d=2), scenario("b", p=2, d=2), settings=Settings(interval_s=2))
    w = synthetic(MIXED_LOAD, duration_s=30, shape="tidal", period_s=10, seed=5)
    one, two = (Simulator(cluster).run(w) for _ in range(2))
    assert np.array_equal(one.ttft, two.ttft, equal_nan=True) and np.array_equal(one.tpot, two.tpot, equal_nan=True)
    assert one.timeline == two.timeline


def test_decode_memory_gates_admission(make_cluster):
    """KV for 2 requests on the one decode actor: the third waits for a finish, then runs."""
    cluster = make_cluster(scenario(p=1, d=1), model=profile(capacity=2 * 1100, decode=(0.1, 0.0, 0.0)))
    w = Workload(np.zeros(3), np.full(3, 1000), np.full(3, 100), np.zeros(3, dtype=np.int64), "three")
    run = run_and_check(cluster, Variant(controller=False, admission_timeout_s=100), w)
    assert (run.state == DONE).all()
    assert run.ttft[2] > 99 * 0.1  # started only when one of the first two ended


@pytest.mark.parametrize("controller, end_s", [(False, 3.0), (True, 10.0)])  # the controller's first tick
def test_requests_that_never_get_decode_room_are_rejected_at_their_deadline(make_cluster, controller, end_s):
    cluster = make_cluster(scenario(p=1, d=1), model=profile(capacity=500))
    w = Workload(np.zeros(2), np.array([100, 1000]), np.array([10, 10]), np.zeros(2, dtype=np.int64), "two")
    run = run_and_check(cluster, Variant(controller=controller, admission_timeout_s=3.0), w)
    assert run.state.tolist() == [DONE, REJECTED] and run.end_s == pytest.approx(end_s)


def test_busy_actors_reject_past_the_ttft_budget_and_forwarding_gives_up(make_cluster):
    """One prefill actor, 1 s per request, TTFT 1.5 s: requests behind a running one would
    miss the budget and are rejected; the central scheduler queues them regardless."""
    cluster = make_cluster(scenario(p=1, d=1, ttft=1.5), model=profile(prefill=(1.0, 0.0, 0.0),
                                                                          max_batch_tokens=10))
    w = Workload(np.array([0.0, 0.1, 0.2, 5.0]), np.full(4, 10), np.ones(4, dtype=np.int64),
                 np.zeros(4, dtype=np.int64), "four")
    forward = run_and_check(cluster, Variant(controller=False, admission_timeout_s=0.5), w)
    # the running request counts in full: 1 s queued + 1 s own > 1.5 s; the retry after the hint
    # (0.5 s, capped by the admission window) finds the window closed
    assert forward.state.tolist() == [DONE, REJECTED, REJECTED, DONE]
    central = run_and_check(cluster, Variant(controller=False, placement="central"), w)
    assert (central.state == DONE).all() and central.ttft[2] == pytest.approx(2.8)


def test_stale_reports_herd_onto_one_actor(make_cluster):
    """A burst between two reports: the central scheduler spreads it by what it sent, but the
    actors' real progress is unseen; forwarding sees the live queues. Forwarding's TTFT
    percentiles are no worse."""
    cluster = make_cluster(scenario(p=8, d=2, ttft=2.0), model=profile(prefill=(0.05, 2e-4, 0.0)))
    w = synthetic([Mix(0, 20.0, 1000, 2)], duration_s=200, shape="bursty", period_s=20, seed=4)
    forward = run_and_check(cluster, Variant(controller=False), w)
    central = run_and_check(cluster, Variant(controller=False, placement="central", report_interval_s=5.0), w)
    assert forward.stats()[-1].ttft_attainment >= central.stats()[-1].ttft_attainment


def test_block_fixed_transfer_costs_one_op_per_block(make_cluster):
    """4 layers x K/V x 64 blocks of 16 tokens = 512 ops at 10 us against 8 ops."""
    model = profile(transfer=(0.0, 1e-5))
    cluster = make_cluster(scenario(), model=model)
    w = Workload(np.zeros(1), np.array([1024]), np.array([2]), np.zeros(1, dtype=np.int64), "one")
    contiguous = run_and_check(cluster, Variant(controller=False), w)
    block = run_and_check(cluster, Variant(controller=False, transfer="block"), w)
    nbytes = 1024 * 1024 / 1e12
    assert contiguous.transfer_s[0] == pytest.approx(8 * 1e-5 + nbytes)
    assert block.transfer_s[0] == pytest.approx(512 * 1e-5 + nbytes)


def test_aggregated_prefill_shares_steps_with_decode(make_cluster):
    """One aggregated actor, chunked prefill: a 2000-token prompt arriving mid-decode runs as
    4 chunks of 500, each in a step with the decode batch: both slow down."""
    model = profile(prefill=(0.0, 1e-3, 0.0), decode=(0.01, 0.0, 0.0))
    cluster = make_cluster(scenario(p=1, d=0, limits={"decode": {"min": 0}}), model=model)
    w = Workload(np.array([0.0, 0.5]), np.array([100, 2000]), np.array([101, 2]),
                 np.zeros(2, dtype=np.int64), "two")
    run = run_and_check(cluster, Variant(serving="aggregated", chunk_tokens=500), w)
    # the prompt: 2 s of prefill + 4 steps of decode; the first request: its 100 steps of 10 ms
    # and the 2 s of prefill that its steps carried
    assert run.ttft[1] == pytest.approx(2.0 + 4 * 0.01)
    assert run.tpot[0] * 100 == pytest.approx(1.0 + 2.0, rel=1e-6)
    assert run.utilisation["aggregated"] == pytest.approx((0.1 + 3.0) / run.end_s)


def test_controller_moves_actors_toward_the_short_role(make_cluster):
    """Prompt-heavy load on 1P:3D: the controller flips decode actors to prefill (drain,
    then switch), every request still ends, and TTFT attainment beats the pinned ratio."""
    model = profile(prefill=(0.01, 5e-4, 0.0), decode=(0.01, 1e-4, 0.0))
    settings = Settings(interval_s=5, min_dwell_s=10, confirm=1)
    cluster = make_cluster(scenario(p=1, d=3, ttft=3.0, tpot=0.05), model=model, settings=settings)
    w = synthetic([Mix(0, 3.0, 1000, 20)], duration_s=300, seed=6)
    auto = run_and_check(cluster, Variant(admission_timeout_s=3.0), w)
    fixed = run_and_check(cluster, Variant(controller=False, admission_timeout_s=3.0), w)
    prefill_counts = [p for _, _, p, _ in auto.timeline]
    assert prefill_counts[0] == 1 and max(prefill_counts) >= 2 and auto.actions["flip"] >= 1
    assert auto.stats()[-1].ttft_attainment > fixed.stats()[-1].ttft_attainment


def test_lending_moves_an_actor_between_scenarios(make_cluster):
    model = profile(prefill=(0.01, 5e-4, 0.0), decode=(0.01, 1e-4, 0.0))
    settings = Settings(interval_s=5, min_dwell_s=10, confirm=1)
    cluster = make_cluster(scenario("busy", p=1, d=1, ttft=3.0), scenario("quiet", p=3, d=3, ttft=3.0),
                           model=model, settings=settings)
    w = synthetic([Mix(0, 4.0, 1000, 20), Mix(1, 0.1, 100, 5)], duration_s=200, seed=7)
    sim = Simulator(cluster)
    run = sim.run(w)
    assert run.actions["lend"] >= 1 and len(sim.pools[0].members) > 2 and len(sim.pools[1].members) < 6
