"""The autoscaling policy (scenarios.autoscale) in the simulator, through the shared control round."""
import numpy as np
import pytest

from scenarios.autoscale import ScaleSettings
from scenarios.controller import Settings
from simtests.cluster import Variant
from simtests.results import DONE, REJECTED
from simtests.sim import Simulator
from simtests.workload import Mix, synthetic

from tests.simtests.support import profile, scenario

MODEL = profile(prefill=(0.01, 5e-4, 0.0), decode=(0.01, 1e-4, 0.0))


def test_a_tide_scales_the_fleet_in_and_out_and_every_request_ends(make_cluster):
    """Sized for the peak (12 actors), the fleet shrinks at low tide and grows back at high tide,
    in fewer actor-hours than the static fleet; every request ends, nothing stays reserved."""
    cluster = make_cluster(scenario(p=6, d=6, ttft=3.0, tpot=0.05), model=MODEL,
                           settings=Settings(interval_s=5, min_dwell_s=10))
    cluster = type(cluster)(cluster.specs, cluster.models, cluster.settings, ScaleSettings(start_s=20))
    w = synthetic([Mix(0, 4.0, 1000, 20)], duration_s=1200, shape="tidal", seed=1, period_s=600)
    static = Simulator(cluster).run(w)
    sim = Simulator(cluster, Variant(autoscale=True))
    run = sim.run(w)
    assert set(np.unique(run.state)) <= {DONE, REJECTED} and sim.active == 0
    assert all(a.reserved == 0 and not a.queue and not a.members for a in sim.actors)
    sizes = [n for _, n in run.scale_timeline]
    low = sizes.index(min(sizes))
    assert min(sizes) < 12 and max(sizes[low:]) > min(sizes)  # in, then out again
    assert run.actor_hours < 0.7 * static.actor_hours
    assert static.actor_hours == pytest.approx(static.actors * static.end_s / 3600)
    stopped = [a for a in sim.actors if a.retired_at is not None]
    assert stopped and all(a.draining and a.pool is None for a in stopped)
