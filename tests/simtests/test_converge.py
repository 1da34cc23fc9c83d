"""The convergence measure: from a swapped split back to the reference's goodput."""
from scenarios.controller import Settings
from simtests.converge import converge, swapped
from simtests.workload import Mix, synthetic

from tests.simtests.support import profile, scenario

MODEL = profile(prefill=(0.01, 5e-4, 0.0), decode=(0.01, 1e-4, 0.0))


def test_swapped_exchanges_each_scenarios_counts_within_widened_limits(make_cluster):
    cluster = make_cluster(scenario("a", p=5, d=1), scenario("b", p=2, d=3))
    bad = swapped(cluster)
    assert [(s.prefill, s.decode) for s in bad.specs] == [(1, 5), (3, 2)]
    assert bad.models is cluster.models and bad.settings == cluster.settings


def test_the_controller_brings_a_swapped_split_back_within_the_tolerance(make_cluster):
    """Prompt-heavy load: 4P:1D is right, the swapped 1P:4D starves prefill until the
    controller flips it back; the measure says when, and that it got there."""
    settings = Settings(interval_s=5, min_dwell_s=10, confirm=2)
    cluster = make_cluster(scenario(p=4, d=1, ttft=3.0, tpot=0.05), model=MODEL, settings=settings)
    w = synthetic([Mix(0, 6.0, 1000, 20)], duration_s=600, seed=3)
    c = converge(cluster, w, window_s=30)
    assert c.bad_split == {"s": (1, 4)}
    assert len(c.bad_series) == len(c.reference_series) == int(w.duration_s // 30)
    assert c.bad_series[0] < 0.9 * c.reference_series[0]  # the bad start is bad
    assert c.converged_s is not None and 0 < c.converged_s <= 60
    assert c.actions["flip"] >= 1
