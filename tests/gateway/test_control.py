"""The live ratio controller's loop without Ray: the load window the gateway fills on every
request, and the loop over pools that apply flips at once (or fail): on/off per scenario,
pins (which hold while it is off), limits, the decision log, the counter."""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

import pytest

from gateway.config import Control
from gateway.control import ControlLoop
from gateway.errors import GatewayError
from gateway.fleet import Fleet
from gateway.metrics import Metrics
from gateway.observe import LoadWindow
from mesh.api import ActorReport, ActorState, DrainResult, Role
from mesh.errors import MeshError
from mesh.pool import Member
from mesh.serving_mode import Mode
from scenarios.autoscale import ScaleSettings
from scenarios.control_round import Record
from scenarios.controller import Decision, Settings
from scenarios.mode_policy import ModeDecision
from scenarios.spec import parse_specs
from tests.support.clock import FakeClock

SPECS = parse_specs({"scenarios": [
    {"name": name, "model": "m", "slo": {"ttft_s": 1.0, "tpot_s": 0.1}, "prefill": 1, "decode": 3,
     "limits": {"prefill": {"min": 1, "max": 3}, "decode": {"min": 1, "max": 3}}} for name in ("chat", "code")]})


class Pool:
    """Flips at once; an actor in `broken` refuses."""
    mode, switching = Mode.DISAGGREGATED, False  # as the scenarios' (mesh.pool.Pool)

    def __init__(self, scenario: str, p: int, d: int):
        self.scenario = scenario
        self.members = {f"{scenario}-{i}": Member(f"{scenario}-{i}", role, None,
                                                  ActorReport(f"{scenario}-{i}", scenario, role, ActorState.SERVING))
                        for i, role in enumerate([Role.PREFILL] * p + [Role.DECODE] * d)}
        self.broken: set[str] = set()

    async def flip(self, actor_id: str, role: str, drain_timeout_s=None) -> DrainResult:
        if actor_id in self.broken:
            raise MeshError("unavailable", f"actor {actor_id} is gone")
        member = self.members[actor_id]
        member.role = Role(role)
        member.info = dataclasses.replace(member.info, role=member.role)
        return DrainResult((), member.info)

    async def add(self, role: str) -> Member:
        actor_id = f"{self.scenario}-{len(self.members)}"
        member = Member(actor_id, Role(role), None, ActorReport(actor_id, self.scenario, Role(role),
                                                                 ActorState.SERVING))
        self.members[actor_id] = member
        return member

    async def remove(self, actor_id: str, drain_timeout_s=None) -> DrainResult:
        return DrainResult((), self.members.pop(actor_id).info)

    def split(self) -> tuple[int, int]:
        roles = [m.role for m in self.members.values()]
        return roles.count(Role.PREFILL), roles.count(Role.DECODE)


@dataclass
class Scenario:
    spec: object
    pool: Pool


class FakeFleet:
    get = Fleet.get

    def __init__(self):
        self.scenarios = {s.name: Scenario(s, Pool(s.name, s.prefill, s.decode)) for s in SPECS}


def make(enabled: bool, autoscale: ScaleSettings | None = None, requests: list | None = None):
    fleet, clock = FakeFleet(), FakeClock(1000.0)
    window = LoadWindow({s.name: s.slo for s in SPECS}, clock)
    metrics = Metrics(lambda: {}, SPECS)
    control = Control(enabled=enabled, settings=Settings(interval_s=1, min_dwell_s=0, confirm=1, lend=False, far=1.0),
                      autoscale=autoscale)
    ask = requests.append if requests is not None else None
    return (ControlLoop(fleet, window, metrics, control, clock, **({"request_resources": ask} if ask else {})),
            fleet, clock, window, metrics)


def prompt_heavy(window: LoadWindow, clock: FakeClock, scenario: str = "chat") -> None:
    """One interval of long prompts whose TTFT mostly missed."""
    for i in range(20):
        window.arrived(scenario, 4000)
        window.ended(scenario, 0.5 if i % 4 == 0 else 3.0, 0.05, 20, kv_short=False)
    clock.now += 1


def test_window_counts_rates_and_attainment_and_keeps_means_over_quiet_intervals():
    clock = FakeClock(1000.0)
    window = LoadWindow({s.name: s.slo for s in SPECS}, clock)
    for ttft, tpot, short in ((0.5, 0.05, False), (2.0, 0.05, True), (None, None, False), (0.9, 0.2, False)):
        window.arrived("chat", 100)
        window.ended("chat", ttft, tpot, 10, short)
    clock.now += 2
    [obs] = window.close({"chat": ()})
    assert (obs.arrival_rps, obs.mean_prompt, obs.mean_output) == (2.0, 100, 10)
    assert (obs.ttft_attainment, obs.tpot_attainment, obs.kv_short) == (0.5, 0.75, 0.25)
    assert window.last["code"].requests_ended == 0 and window.last["chat"].requests_ended == 4
    clock.now += 2
    [obs] = window.close({"chat": ()})
    assert (obs.arrival_rps, obs.mean_prompt, obs.mean_output, obs.ttft_attainment) == (0, 100, 10, None)


def test_on_it_flips_toward_prefill_and_logs_counts_and_records_each_decision():
    loop, fleet, clock, window, metrics = make(enabled=True)
    for _ in range(6):
        prompt_heavy(window, clock)
        asyncio.run(loop.tick())
    assert fleet.scenarios["chat"].pool.split() == (3, 1)
    assert fleet.scenarios["code"].pool.split() == (1, 3)  # no load there: nothing to move
    records = loop.decisions("chat")
    assert len(records) == 2 and all(not r.failures for r in records)
    assert "flip 1 decode -> prefill" in records[0].decision.reason
    assert metrics.decisions.labels("chat", "flip", "prefill")._value.get() == 2
    [state] = [s for s in loop.states() if s.scenario == "chat"]
    assert (state.current, state.target, state.pin, state.enabled) == ((3, 1), (3, 1), None, True)


def test_off_nothing_moves_but_a_pin_holds_and_auto_hands_back():
    loop, fleet, clock, window, _ = make(enabled=False)
    prompt_heavy(window, clock)
    assert asyncio.run(loop.tick()) == []
    loop.set_ratio("chat", 2, 2)
    for _ in range(3):
        prompt_heavy(window, clock)
        asyncio.run(loop.tick())
    assert fleet.scenarios["chat"].pool.split() == (2, 2)
    assert "pinned at 2:2" in loop.decisions("chat")[0].decision.reason
    loop.auto("chat")
    assert loop.enabled == {"chat": True, "code": False} and "chat" not in loop.controller.pins
    loop.set_enabled("", False)
    assert loop.enabled == {"chat": False, "code": False}


def test_a_mode_switch_is_in_its_scenarios_decision_log_among_the_others():
    from gateway.admin import decision_message

    loop, fleet, clock, window, _ = make(enabled=True)
    prompt_heavy(window, clock)
    asyncio.run(loop.tick())  # a flip in chat
    switch = ModeDecision(clock(), "code", Mode.AUTO, Mode.AGGREGATED, 0, {"actors": 4}, "light: auto -> aggregated")
    loop.mode_records.append(Record(switch, ()))
    assert [r.decision for r in loop.decisions("code")] == [switch]
    assert [type(r.decision) for r in loop.decisions("chat")] == [Decision]
    assert [type(r.decision) for r in loop.decisions()] == [Decision, ModeDecision]  # newest last
    shown = decision_message(loop.decisions("code")[0])
    assert (shown.action, shown.current_mode, shown.target_mode, shown.reason) == (
        "switch", "auto", "aggregated", "light: auto -> aggregated")


def test_operator_errors():
    loop, *_ = make(enabled=True)
    for call, code, message in [
        (lambda: loop.set_ratio("chat", 0, 4), "invalid_argument", "prefill 0 is outside scenario 'chat''s limits [1, 3]"),
        (lambda: loop.set_ratio("chat", 1, 4), "invalid_argument", "decode 4 is outside"),
        (lambda: loop.set_ratio("chat", 0, 0), "invalid_argument", "at least one actor"),
        (lambda: loop.set_ratio("nope", 1, 1), "not_found", "unknown scenario 'nope'"),
        (lambda: loop.auto("nope"), "not_found", "unknown scenario 'nope'"),
        (lambda: loop.set_enabled("nope", True), "not_found", "unknown scenario 'nope'"),
        (lambda: loop.decisions("nope"), "not_found", "unknown scenario 'nope'"),
    ]:
        with pytest.raises(GatewayError) as info:
            call()
        assert info.value.code == code and message in info.value.message


def test_a_failed_flip_is_recorded_and_the_loop_goes_on():
    loop, fleet, clock, window, _ = make(enabled=True)
    pool = fleet.scenarios["chat"].pool
    pool.broken = set(pool.members)
    prompt_heavy(window, clock)
    [decision] = asyncio.run(loop.tick())
    [record] = loop.decisions("chat")
    assert record.decision is decision and "is gone" in record.failures[0]
    pool.broken.clear()
    for _ in range(4):
        prompt_heavy(window, clock)
        asyncio.run(loop.tick())
    assert pool.split()[0] > 1


def test_the_controller_sees_where_each_actor_runs():
    """Its views carry each actor's device, so that its flips and lends keep actors on their
    roles' hardware (scenarios.controller; the pools check again)."""
    loop, fleet, *_ = make(enabled=True)
    for m in fleet.scenarios["chat"].pool.members.values():
        m.info = dataclasses.replace(m.info, device="npu:0" if m.role is Role.PREFILL else "cuda:1")
    assert [(v.role, v.device) for v in loop._views("chat")] == [("prefill", "npu")] + [("decode", "cuda")] * 3


def test_autoscaling_adds_for_a_load_asks_ray_and_logs_each_scale_step_with_its_reason():
    """A load the fleet is short of: the autoscaler's step adds actors in the same round, asks Ray's
    autoscaler for one bundle per added actor first, and shows in the decision log with its reason;
    once idle, it drains them and the request shrinks back."""
    requests = []
    loop, fleet, clock, window, _ = make(enabled=True, autoscale=ScaleSettings(start_s=1.0, idle_intervals=2, reserve=2),
                                         requests=requests)
    for _ in range(3):
        prompt_heavy(window, clock)
        asyncio.run(loop.tick())
    scale = [r for r in loop.decisions("chat") if r.decision.actions[0].kind == "add"]
    assert scale and "forecast" in scale[0].decision.reason and "add" in scale[0].decision.reason
    assert len(fleet.scenarios["chat"].pool.members) > 4 and not any(r.failures for r in scale)
    assert requests[-1] == [{"CPU": 1.0}] * (len(fleet.scenarios["chat"].pool.members) - 4)
    for _ in range(4):
        clock.now += 1
        asyncio.run(loop.tick())
    removes = [r for r in loop.decisions("chat") if r.decision.actions[0].kind == "remove"]
    assert removes and "drain and stop" in removes[0].decision.reason
    assert len(fleet.scenarios["chat"].pool.members) < 6 and len(requests[-1]) < len(max(requests, key=len))
