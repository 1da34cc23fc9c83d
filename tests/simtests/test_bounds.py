"""The bounds `--compare` prints beside its rows: goodput were every request within SLO
(`--compare pools`) and the actor-hours of a fleet that held each window's need
(`--compare autoscale`)."""
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from gateway.cli import main
from simtests.cluster import peak_sized
from simtests.compare import compare, ideal_fleet, within_slo
from simtests.workload import Mix, Workload, synthetic

from tests.simtests.support import profile, scenario

TINY = ["--actors", "8", "--duration", "60", "--mix", "short:4:500:50", "--mix", "long:1:12000:100"]


def _arrivals(*per_window: int, window_s: float = 10.0) -> Workload:
    """Requests alike, evenly spread in each window; the last ends the load in the last window."""
    t = np.concatenate([k * window_s + np.linspace(0.0, window_s - 0.1, n) for k, n in enumerate(per_window)])
    n = len(t)
    return Workload(t, np.full(n, 1000), np.full(n, 20), np.zeros(n, dtype=np.int64), "test")


def test_the_ideal_fleet_holds_the_mean_need_over_the_peak(make_cluster):
    cluster = make_cluster(scenario(tpot=0.05), model=profile(prefill=(0.01, 5e-4, 0.0), decode=(0.01, 1e-4, 0.0)))
    share, needs = ideal_fleet(cluster, _arrivals(20, 10, 0, 10), 10.0)
    assert len(needs) == 4 and needs[0] > 0
    assert np.allclose(np.array(needs) / needs[0], [1.0, 0.5, 0.0, 0.5])  # alike requests: need by rate
    assert share == pytest.approx(0.5)
    # the static fleet of `--compare autoscale` is that peak need, in whole actors
    assert peak_sized(cluster, _arrivals(20, 10, 0, 10)).scale.budget == max(math.ceil(needs[0]), 2)


def test_no_split_beats_every_request_within_slo(make_cluster):
    cluster = make_cluster(scenario("a", p=2, d=2, ttft=2.0, tpot=0.05), scenario("b", p=2, d=2, ttft=2.0, tpot=0.05),
                           model=profile(prefill=(0.01, 5e-4, 0.0), decode=(0.01, 1e-4, 0.0)))
    w = synthetic([Mix(0, 6.0, 1000, 20), Mix(1, 2.0, 3000, 20)], duration_s=120, shape="tidal", period_s=60)
    (o,) = compare(["pools"], cluster, w)
    ceiling = within_slo(o.pdmesh)
    assert ceiling == pytest.approx(len(w) / w.duration_s / o.pdmesh.actors)
    assert max(o.values) <= ceiling
    assert f"{ceiling:.4g} req/s per actor, {ceiling / o.values[1] - 1:+.1%} over the baseline" in o.bound


def test_compare_prints_its_bounds_in_every_output():
    r = CliRunner().invoke(main, ["sim", *TINY, "--compare", "pools", "--compare", "autoscale", "--output", "json"])
    assert r.exit_code == 0, r.output
    bounds = json.loads(r.stdout)["bounds"]
    assert len(bounds) == 2
    assert bounds[0].startswith("bound of per-scenario pools + ratio controller vs one mixed pool, best static "
                                "ratio: every request within SLO is ")
    assert bounds[1].startswith("bound of autoscaling vs static fleet sized for the peak: a fleet that held each "
                                "window's need") and "with 10 s windows" in bounds[1]
    assert "with 60 s windows" in bounds[1]
    r = CliRunner().invoke(main, ["sim", *TINY, "--compare", "autoscale"])
    assert r.exit_code == 0 and bounds[1] in " ".join(r.output.split())
    r = CliRunner().invoke(main, ["sim", *TINY, "--compare", "transfer", "--output", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["bounds"] == []
