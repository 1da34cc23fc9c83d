"""The mode policy (scenarios.mode_policy) on scripted load, and its hook in the control round:
an auto scenario goes aggregated while the load is light and splits again under load, with
hysteresis; aggregated scenarios are left out of the ratio controller's round."""
import pytest

from mesh.placement import Mode
from mesh.roles import Role
from scenarios.control_round import ControlRound
from scenarios.controller import ActorView, Observation, RatioController, Settings
from scenarios.mode_policy import ModePolicy, ModeSettings
from scenarios.perf_model import from_profile
from scenarios.spec import parse_specs
from tests.scenarios.support import PROFILE

# With PROFILE, 200-token prompts and 100 output tokens: one aggregated actor carries ~5.2
# requests/s, four ~21: light load is at most 0.4 of that, heavy at least 0.8.
LIGHT, MIDDLE, HEAVY = 2.0, 12.0, 20.0
SETTINGS = ModeSettings(low=0.4, high=0.8, confirm=2, min_dwell_s=30)


def specs(*modes):
    return parse_specs({"scenarios": [{"name": f"s{i}", "model": "m", "slo": {"ttft_s": 2.0, "tpot_s": 0.05},
                                       "mode": mode, **({"prefill": 2, "decode": 2} if mode != "aggregated"
                                                        else {"both": 4})} for i, mode in enumerate(modes)]})


def policy(*modes, settings=SETTINGS):
    s = specs(*modes)
    return ModePolicy(s, {spec.name: from_profile(PROFILE) for spec in s}, settings)


def observe(name, rate, attainment=(1.0, 1.0), actors=4):
    return Observation(name, rate, 200, 100, *attainment, tuple(ActorView(f"{name}-{i}", Role.DECODE)
                                                                  for i in range(actors)))


def steps(p, loads, start=0.0, interval=10.0):
    """One step per interval; the decisions of each."""
    return [p.step([observe("s0", *load) if isinstance(load, tuple) else observe("s0", load)], start + i * interval)
            for i, load in enumerate(loads)]


def test_light_load_aggregates_an_auto_scenario_once_confirmed():
    p = policy("auto")
    assert steps(p, [LIGHT], start=100) == [[]] and p.mode("s0") is Mode.AUTO
    [d] = steps(p, [LIGHT], start=110)[0]
    assert (d.current, d.target, d.prefill) == (Mode.AUTO, Mode.AGGREGATED, 0)
    assert d.reason.startswith("load 0.10 of the pool aggregated (2.00/s, 4 actors) at or below 0.4, SLOs met")
    assert p.mode("s0") is Mode.AGGREGATED and not p.ratio_controlled("s0")


def test_heavy_load_or_missed_tpot_splits_it_again_after_the_dwell():
    p = policy("auto")
    steps(p, [LIGHT, LIGHT], start=100)  # aggregated at t=110
    assert steps(p, [HEAVY, HEAVY], start=120) == [[], []]  # confirmed at 130, but within the dwell
    [d] = steps(p, [HEAVY], start=140)[0]
    assert (d.target, d.prefill) == (Mode.AUTO, 1)  # prefill is about a tenth of the work: 1P:3D
    assert d.reason.endswith("at or above 0.8: aggregated -> auto: 1P:3D")
    steps(p, [LIGHT, LIGHT], start=200)  # aggregated again
    [d] = steps(p, [(MIDDLE, (1.0, 0.5)), (MIDDLE, (1.0, 0.5))], start=300)[1]
    assert d.reason.startswith("TPOT misses its goal: prefills slow the decodes") and d.target is Mode.AUTO


def test_the_dead_band_and_missed_slos_keep_the_mode():
    p = policy("auto")
    assert steps(p, [MIDDLE] * 4 + [(LIGHT, (0.5, 1.0))] * 4, start=100) == [[]] * 8  # TTFT missed: no merge
    steps(p, [LIGHT, LIGHT], start=200)
    assert steps(p, [MIDDLE] * 4, start=300) == [[]] * 4 and p.mode("s0") is Mode.AGGREGATED
    assert steps(p, [HEAVY, LIGHT, HEAVY, LIGHT], start=400) == [[]] * 4  # never twice in a row


def test_an_aggregated_pool_of_one_actor_is_never_split():
    p = policy("auto")
    steps(p, [LIGHT, LIGHT], start=100)
    assert [p.step([observe("s0", HEAVY, actors=1)], 200 + 10 * i) for i in range(3)] == [[]] * 3


def test_only_auto_scenarios_move_and_aggregated_ones_have_no_ratio():
    p = policy("disaggregated", "aggregated")
    loads = [[observe("s0", LIGHT), observe("s1", HEAVY)] for _ in range(4)]
    assert [p.step(obs, 100 + 10 * i) for i, obs in enumerate(loads)] == [[]] * 4
    assert p.ratio_controlled("s0") and not p.ratio_controlled("s1")
    with pytest.raises(ValueError, match="0 < low < high"):
        policy("auto", settings=ModeSettings(low=0.9, high=0.8))


class Window:
    def __init__(self, observations):
        self.observations = observations

    def close(self, actors):
        return [o for o in self.observations if o.scenario in actors]


class Connector:
    def __init__(self):
        self.applied, self.switched = [], []

    async def apply(self, action):
        self.applied.append(action)

    async def switch_mode(self, decision):
        self.switched.append((decision.scenario, decision.target, decision.prefill))


async def test_the_control_round_switches_through_the_connector_and_steers_no_aggregated_ratio():
    s = specs("auto", "aggregated")
    model = from_profile(PROFILE)
    controller = RatioController(s, {spec.name: model for spec in s}, Settings(min_dwell_s=0, confirm=1))
    # s1 is aggregated and far too small for its load: the ratio controller would take lends for it
    window = Window([observe("s0", LIGHT), observe("s1", 200.0, actors=0)])
    connector = Connector()
    modes = ModePolicy(s, {spec.name: model for spec in s}, ModeSettings(confirm=1, min_dwell_s=0))
    loop = ControlRound(controller, window, connector, clock=lambda: 1000.0, modes=modes)
    records = await loop.round({"s0": window.observations[0].actors, "s1": ()})
    assert connector.switched == [("s0", Mode.AGGREGATED, 0)] and [r.failures for r in loop.mode_records] == [()]
    assert records == [] and connector.applied == []  # neither scenario has a ratio now


def test_the_auto_modes_short_prompt_is_what_prefills_within_one_tpot_target():
    from scenarios.conditional import conditional_for

    model = from_profile(PROFILE)  # prefill: 10 ms + 0.1 ms a token
    [auto] = specs("auto")
    assert conditional_for(auto, model).local_prefill_tokens == 400  # 10 + 40 ms: the 50 ms TPOT target
    [given] = parse_specs({"scenarios": [{"name": "g", "model": "m", "slo": {"ttft_s": 2.0, "tpot_s": 0.05},
                                          "mode": "auto", "local_prefill_tokens": 64}]})
    policy = conditional_for(given, model)
    assert (policy.local_prefill_tokens, policy.ttft_s, policy.prefill_s(100)) == (64, 2.0, pytest.approx(0.02))
