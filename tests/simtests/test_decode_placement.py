"""The simulator places decode KV by the router's order with the request's TPOT predicted
(mesh.routing.ForwardOnRejection.decode_order, `meets`), as live dispatch does: a request
whose transfer and steps would miss its TPOT target on the most free decode actor goes to one
where they meet it."""
from __future__ import annotations

import numpy as np

from simtests.cluster import Variant
from simtests.sim import Simulator
from simtests.workload import Workload
from tests.simtests.support import profile, scenario


def _third_placed(make_cluster, capacity: int):
    """Where r2's KV goes, and its run. Steps of 10 ms + 1 us per context token; prefill 0.1 ms a
    token, transfer free. r0: a small context with a long output (much KV reserved, fast steps);
    r1: a 40k-token context (steps of 50 ms, less KV reserved); r2 at 5 s, after r1 joined: 3 output
    tokens, which meet the 30 ms TPOT target on r0's actor only."""
    cluster = make_cluster(scenario("s", p=1, d=2, tpot=0.03),
                           model=profile(decode=(0.01, 0.0, 1e-6), prefill=(0.0, 1e-4, 0.0), capacity=capacity))
    sim = Simulator(cluster, Variant(controller=False))
    w = Workload(np.array([0.0, 0.0, 5.0]), np.array([100, 40_000, 1000]), np.array([600_000, 300_000, 3]),
                 np.zeros(3, dtype=np.int64), "sequence")
    run = sim.run(w)
    first, second = (a.id for a in sim.actors if a.role.value == "decode")
    assert sim.decode_of[:2] == [first, second]
    return ("r0's" if sim.decode_of[2] == first else "r1's"), run


def test_a_short_output_decodes_where_its_steps_meet_its_tpot_not_where_most_kv_is_free(make_cluster):
    placed, run = _third_placed(make_cluster, 10**9)
    # the most free actor when r2 came was r1's, where its steps would take 51 ms
    assert placed == "r0's"
    assert run.tpot_ok[2] and run.tpot[2] < 0.03


def test_while_decode_kv_is_short_room_alone_decides(make_cluster):
    # 940k of the two actors' 1.22M tokens reserved: under 40% free (ForwardOnRejection.tpot_headroom)
    placed, run = _third_placed(make_cluster, 610_000)
    assert placed == "r1's" and not run.tpot_ok[2]
