"""Prefix caches on prefill actors, from a trace's prefix block ids (Mooncake's hash_ids)."""
import numpy as np
import pytest

from simtests.cluster import Variant
from simtests.sim import Simulator
from simtests.workload import Workload
from tests.simtests.support import profile, scenario

IDS = {0: [1, 2], 1: [1, 2, 3], 2: [7]}


def workload(arrival, prompt, ids=IDS):
    n = len(arrival)
    return Workload(np.array(arrival, dtype=float), np.array(prompt), np.full(n, 2), np.zeros(n, dtype=np.int64),
                    "prefixes", ids.__getitem__)


def test_a_cached_prefix_is_not_computed_again(make_cluster):
    """1 ms per token: the second request shares 2 blocks of 512 with the first."""
    cluster = make_cluster(scenario(p=1, d=1), model=profile(prefill=(0.0, 1e-3, 0.0)))
    w = workload([0.0, 5.0, 10.0], [1100, 1600, 300])
    run = Simulator(cluster, Variant(controller=False, prefix="idle-first")).run(w)
    assert run.hit.tolist() == [0, 1024, 0]
    assert run.ttft.tolist() == pytest.approx([1.1, 1.6 - 1.024, 0.3])
    assert run.stats()[-1].prefix_hit_rate == pytest.approx(1024 / 3000)
    off = Simulator(cluster, Variant(controller=False)).run(w)
    assert off.hit.sum() == 0 and off.ttft[1] == pytest.approx(1.6)


def test_prefix_aware_offers_go_to_the_holder_first(make_cluster):
    """Four idle prefill actors: idle-first takes any; prefix-aware the one that holds the prefix."""
    cluster = make_cluster(scenario(p=4, d=1), model=profile(prefill=(0.0, 1e-3, 0.0)))
    w = workload([0.0, 5.0], [1100, 1600], {0: [1, 2], 1: [1, 2, 3]})
    aware = Simulator(cluster, Variant(controller=False, prefix="prefix-aware")).run(w)
    assert aware.hit.tolist() == [0, 1024]


def test_caches_evict_least_recent_blocks_and_the_index_follows(make_cluster):
    """Room for 2 blocks of 512 in the actor's KV: [1, 2] then [7] evicts 1; [1, 2] misses."""
    cluster = make_cluster(scenario(p=1, d=1), model=profile(prefill=(0.0, 1e-3, 0.0), capacity=1024))
    w = workload([0.0, 5.0, 10.0], [600, 300, 600], {0: [1, 2], 1: [7], 2: [1, 2]})
    sim = Simulator(cluster, Variant(controller=False, prefix="prefix-aware"))
    run = sim.run(w)
    assert run.hit.tolist() == [0, 0, 0]
    cached = {h: {a.id} for a in sim.actors for h in a.cache}
    assert sim.pools[0].holders == cached and set(cached) == {1, 2}
