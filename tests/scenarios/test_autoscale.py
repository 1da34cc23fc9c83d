"""The autoscaler on scripted loads, against a cluster that adds and removes actors at once."""
import math
import random
from dataclasses import replace

import pytest

from mesh.roles import Role
from scenarios.autoscale import Autoscaler, ScaleSettings
from scenarios.controller import ActorView, Observation, RatioController, Settings
from scenarios.perf_model import from_profile
from scenarios.spec import parse_specs

PROFILE = {"name": "p", "source": "test figures", "kv_bytes_per_token": 1024, "kv_capacity_tokens": 100_000,
           "layers": 4, "prefill": {"intercept_s": 0.01, "per_token_s": 1e-4},
           "decode": {"intercept_s": 0.02, "per_seq_s": 1e-3, "per_context_token_s": 1e-7},
           "transfer": {"per_op_s": 1e-5, "bytes_per_s": 1e9}}
INTERVAL = 10.0


def scenario(name="chat", p=1, d=1, max_each=20, priority=0):
    return {"name": name, "model": "m", "slo": {"ttft_s": 2.0, "tpot_s": 0.05}, "prefill": p, "decode": d,
            "limits": {"prefill": {"min": 1, "max": max_each}, "decode": {"min": 1, "max": max_each}},
            "priority": priority}


class Fleet:
    def __init__(self, specs):
        self.roles = {s.name: [Role.PREFILL] * s.prefill + [Role.DECODE] * s.decode for s in specs}
        self.ids = 0

    def observe(self, name, rate):
        actors = tuple(ActorView(f"{name}-{i}", r) for i, r in enumerate(self.roles[name]))
        return Observation(name, rate, 1500, 150, 1.0, 1.0, actors)

    def apply(self, decisions):
        for d in decisions:
            removed = sorted((int(a.actor_id.rsplit("-", 1)[1]) for a in d.actions if a.kind == "remove"),
                             reverse=True)  # by index in the observed order: the highest first
            for i in removed:
                del self.roles[d.scenario][i]
            self.roles[d.scenario] += [a.role for a in d.actions if a.kind == "add"]


def make(*dicts, settings=ScaleSettings()):
    specs = parse_specs({"scenarios": list(dicts or [scenario()])})
    model = from_profile(PROFILE)
    ctrl = RatioController(specs, {s.name: model for s in specs}, Settings(interval_s=INTERVAL))
    return Autoscaler(ctrl, settings), Fleet(specs)


def drive(scaler, fleet, rates):
    """rates[i]: {scenario: arrivals/s} for interval i; returns the actor counts after each."""
    history = []
    for i, rate in enumerate(rates):
        fleet.apply(scaler.step([fleet.observe(n, rate[n]) for n in fleet.roles], i * INTERVAL))
        history.append({n: len(r) for n, r in fleet.roles.items()})
    return history


def need(scaler, rate, name="chat"):
    return scaler.controller.need(Observation(name, rate, 1500, 150, None, None, ()))[0].total


def test_a_rising_load_is_met_ahead_by_the_trend():
    """Arrivals climb 0.5/s per interval: the fleet keeps up with the load one start-up ahead."""
    scaler, fleet = make()
    rates = [{"chat": 1.0 + 0.5 * i} for i in range(20)]
    h = drive(scaler, fleet, rates)
    assert all(h[i]["chat"] >= need(scaler, rates[i]["chat"]) for i in range(3, 20))
    assert scaler.controller.specs["chat"] and h[-1]["chat"] > 2


def test_an_idle_scenario_shrinks_by_drain_in_one_step_to_its_minimum():
    """After idle_intervals (6) of slack, every actor beyond the need and the band at once."""
    scaler, fleet = make(scenario(p=6, d=6))
    h = drive(scaler, fleet, [{"chat": 0.1}] * 100)
    counts = [x["chat"] for x in h]
    assert counts[4] == 12 and counts[5] == 2 and set(counts[5:]) == {2}  # one actor per role: the minimum


def test_a_recurring_burst_is_met_before_it_starts():
    """Bursts every 30 intervals, 3 intervals long: once the period shows in the history, the
    fleet grows ahead of each burst (a start-up time early) and shrinks between them."""
    scaler, fleet = make(settings=ScaleSettings(start_s=20.0))
    rates = [{"chat": 20.0 if i % 30 < 3 else 0.5} for i in range(240)]
    h = drive(scaler, fleet, rates)
    peak = need(scaler, 20.0)
    late = [i for i in range(150, 240) if i % 30 == 0]
    # the counts seen by a burst's first interval are those after the interval before it
    assert all(h[i - 1]["chat"] >= peak - 1e-9 for i in late)
    assert min(h[i]["chat"] for i in range(150, 240)) < peak / 2


@pytest.mark.parametrize("seed", range(4))
def test_noisy_steady_load_does_not_oscillate(seed):
    rng = random.Random(seed)
    scaler, fleet = make()
    drive(scaler, fleet, [{"chat": 8.0}] * 10)
    h = drive(scaler, fleet, [{"chat": 8.0 * rng.uniform(0.8, 1.2)} for _ in range(200)])
    counts = [x["chat"] for x in h]
    changes = sum(a != b for a, b in zip(counts, counts[1:]))
    assert changes <= 4 and max(counts) - min(counts) <= 2


def test_the_budget_goes_to_the_higher_priority_first():
    scaler, fleet = make(scenario("low"), scenario("high", priority=1), settings=ScaleSettings(budget=10))
    h = drive(scaler, fleet, [{"low": 10.0, "high": 10.0}] * 5)
    assert sum(h[-1].values()) == 10
    assert h[-1]["high"] >= need(scaler, 10.0, "high") - 1e-9 and h[-1]["low"] < h[-1]["high"]


def test_every_scale_decision_says_why():
    scaler, fleet = make()
    d = scaler.step([fleet.observe("chat", 10.0)], 0.0)[0]
    assert d.actions[0].kind == "add" and sum(d.target) > sum(d.current) and "forecast 10.00 req/s" in d.reason


def test_a_burst_before_any_period_is_known_is_held_as_a_reserve():
    """A burst seen once may come back before a start-up time could meet it: until the arrivals
    show a period the fleet keeps the burst's need for `reserve` intervals, then shrinks."""
    scaler, fleet = make(settings=ScaleSettings(reserve=40))
    h = drive(scaler, fleet, [{"chat": 20.0}] * 3 + [{"chat": 0.5}] * 80)
    peak = need(scaler, 20.0)
    counts = [x["chat"] for x in h]
    assert min(counts[2:40]) >= peak - 1e-9
    assert counts[-1] < peak / 4


def test_the_reserve_is_the_fleets_wherever_the_controller_lent_it():
    """The reserve actors that the controller lent to another scenario are not scaled in there."""
    scaler, fleet = make(scenario("chat"), scenario("docs"), settings=ScaleSettings(reserve=40))
    drive(scaler, fleet, [{"chat": 20.0, "docs": 0.5}] * 3 + [{"chat": 0.5, "docs": 0.5}] * 10)
    held = sum(len(r) for r in fleet.roles.values())
    fleet.roles["docs"] += fleet.roles["chat"][2:]  # lent: docs holds what chat kept
    del fleet.roles["chat"][2:]
    h = drive(scaler, fleet, [{"chat": 0.5, "docs": 0.5}] * 20)
    assert all(sum(x.values()) == held for x in h)


def test_the_controller_keeps_actors_scaled_out_for_a_forecast_burst():
    """Scaled out ahead of a burst, a scenario's actors exceed what its current load needs; the
    controller, planning on the autoscaler's forecast, does not lend them away before it comes."""
    scaler, fleet = make(scenario("chat", p=10, d=10), scenario("docs"))
    quiet = [fleet.observe("chat", 0.5), fleet.observe("docs", 0.5)]
    assert any(a.kind == "lend" for d in scaler.controller.step(quiet, 100.0) for a in d.actions)
    scaler, fleet = make(scenario("chat", p=10, d=10), scenario("docs"))
    assert not scaler.controller.step(quiet, 100.0, expected={"chat": 20.0})


def test_the_controller_plans_on_a_forecast_only_where_it_comes_from_a_period():
    """A trend extrapolated a start-up ahead is for starting actors: on a rising load with no
    period the controller is given no forecast (it would lend actors to every spike); once
    recurring bursts show their period, it plans on the forecast."""
    scaler, fleet = make()
    drive(scaler, fleet, [{"chat": 1.0 + 0.5 * i} for i in range(20)])
    assert scaler._trend["chat"].slope > 0 and scaler.expected == {}
    scaler, fleet = make(settings=ScaleSettings(start_s=20.0))
    drive(scaler, fleet, [{"chat": 20.0 if i % 30 < 3 else 0.5} for i in range(150)])
    assert scaler._trend["chat"].period % 30 == 0 and scaler.expected["chat"] > 0


@pytest.mark.parametrize("seed", [1, 2])
def test_spiky_load_without_a_period_shows_none(seed):
    """Aperiodic spikes (as the Mooncake trace's long prompts arrive): over few intervals the
    autocorrelation at some lag reaches season_fit by chance; a period must also beat what
    noise reaches over the intervals compared (without that bound these loads showed several)."""
    def periods(settings):
        rng = random.Random(seed)
        scaler, fleet = make(settings=settings)
        found = set()
        for i in range(360):
            fleet.apply(scaler.step([fleet.observe("chat", 4.0 * rng.expovariate(1.0))], i * INTERVAL))
            found.add(scaler._trend["chat"].period)
        return found - {None}

    assert periods(ScaleSettings(season_z=0.0))  # the chance "periods" are there to be found
    assert not periods(ScaleSettings())


def test_a_slow_tide_is_not_taken_for_a_period_until_it_repeats():
    """A tide of 180 intervals: a slowly changing load resembles itself a few intervals later
    (autocorrelation 0.99 at 6 intervals) without repeating; no period until the tide comes
    round again, then the tide's own (a period of 6 intervals had been found at once)."""
    scaler, fleet = make(settings=ScaleSettings(history=1440))
    rates = [{"chat": 10.0 + 8.0 * math.sin(2 * math.pi * i / 180)} for i in range(420)]
    periods = []
    for i, rate in enumerate(rates):
        fleet.apply(scaler.step([fleet.observe("chat", rate["chat"])], i * INTERVAL))
        periods.append(scaler._trend["chat"].period)
    assert set(periods[:180]) == {None}
    assert all(p is not None and abs(p - 180) <= 9 for p in periods[-60:])  # the peak is broad: within 5%


def test_misses_at_the_models_size_raise_the_fleet_until_the_slos_are_met_then_it_falls_back():
    """A scenario that misses its TTFT goal at the size the model gives it (as long-tailed prompts
    do): its correction grows the fleet past the controller's boost for one interval's misses,
    the decision says why, and once the SLOs are met the correction falls back and the fleet
    shrinks to the model's need again."""
    scaler, fleet = make(settings=ScaleSettings(reserve=6))
    rate, base = 10.0, need(scaler, 10.0)
    missed = scaler.controller.need(Observation("chat", rate, 1500, 150, 0.5, 1.0, ()))[0].total  # the boost
    decisions, counts = [], []
    for i in range(200):
        attained = 0.5 if i < 20 else 1.0
        step = scaler.step([replace(fleet.observe("chat", rate), ttft_attainment=attained)], i * INTERVAL)
        fleet.apply(step)
        decisions += step
        counts.append(len(fleet.roles["chat"]))
    assert max(counts[:21]) >= 1.5 * missed
    assert any("for SLO misses" in d.reason for d in decisions)
    assert scaler._trend["chat"].correction == 1.0 and counts[-1] <= math.ceil(base) + 2


def test_a_few_misses_among_few_requests_are_not_taken_for_a_shortfall():
    """At one request per second an interval holds ten: two misses in it are within chance of a
    90% goal and leave the correction alone; the same share of a busy interval's 200 is not."""
    scaler, fleet = make()
    few = Observation("chat", 1.0, 1500, 150, 0.8, 1.0, fleet.observe("chat", 1.0).actors)
    for i in range(10):
        scaler.step([few], i * INTERVAL)
    assert scaler._trend["chat"].correction == 1.0
    scaler.step([replace(few, arrival_rps=20.0)], 100.0)
    assert scaler._trend["chat"].correction > 1.0
