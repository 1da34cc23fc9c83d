"""The controller moves an auto scenario between serving modes live, on a real local Ray: a
light load aggregates it, long prompts arriving fast split it again, and at each switch a
request is held mid-flight on an actor the switch flips (mesh.faults' stop points: the
actor's process stops itself in the request's prefill, or at its 4th token, and the test
resumes it once the switch is draining that actor, whose short drain then gives the request
back).

The rounds run when the test says, on a fake clock that sets each interval's length, so that
the load each round sees is the script's and not the machine's speed. Every request ends with
the tokens of the engine alone; the switches are in the decision log with their reasons, and
in `pdmesh status`; flips to a role outside the pool's mode now are refused."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import pytest

from gateway.proto import inference_pb2, inference_pb2_grpc
from mesh import ActorState, Mode, Role
from mesh.faults import read_log
from tests.gateway.support import (API_KEY, ENGINE, Running, assert_no_blocks_held, cli, first_json, http, ok_json,
                                   serving)
from tests.support.clock import FakeClock

SHORT = [5] * 6  # prefilled on the decode actor in auto (local_prefill_tokens 16)
LONG = [3 + i % 50 for i in range(100)]  # prefilled on the prefill actor
HELD = {"held-1": "5c0ffee5c0ffee5c0ffee5c0ffee0001", "held-2": "5c0ffee5c0ffee5c0ffee5c0ffee0002"}  # id: trace
HELD_TOKENS = 140  # far more than a drain of DRAIN_S lets it finish: the drain gives it back
DRAIN_S = 0.001
FAULTS = "stop:prefill@request=held-1;stop:decode_step=4@request=held-2"
BOUND_S = 120  # on each wait: a bound that turns a hang into a failure


@pytest.fixture(scope="module")
def fault_log(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mode-switch") / "fired.jsonl")


@pytest.fixture(scope="module")
def switching(checkpoint, ray_cluster, fault_log):
    """An auto scenario (1 prefill + 1 decode actor, limits that leave the ratio controller
    nothing to move) with the controller on, whose rounds run only when the test calls them."""
    from gateway.config import parse

    config = parse({
        "scenarios": [{"name": "s", "model": str(checkpoint("llama", "float32")), "mode": "auto",
                       "slo": {"ttft_s": 60.0, "tpot_s": 5.0}, "local_prefill_tokens": 16,
                       "limits": {"prefill": {"min": 1, "max": 1}, "decode": {"min": 1, "max": 1}}}],
        # a lease outlasts a slow prefill on a loaded host
        "engine": ENGINE, "transport": {"lease_ttl_s": 10.0, "timeout_s": 5.0},
        "controller": {"enabled": True, "drain_timeout_s": DRAIN_S, "settings": {"interval_s": 3600}}})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PDMESH_FAULT", FAULTS)
        env.setenv("PDMESH_FAULT_LOG", fault_log)
        gateway = serving(config)
        running = gateway.__enter__()  # the pools read the faults when made
    # A held actor is stopped until the switch drains it, however long a loaded host takes to
    # get there: it must not be called dead for the load reports it misses meanwhile.
    for supervisor in running.gateway.fleet.supervisors:
        supervisor.policy = dataclasses.replace(supervisor.policy, max_missed_reports=10**6)
    try:
        yield running
    finally:
        gateway.__exit__(None, None, None)


class Stream:
    """One greedy request over gRPC in a thread of its own: its tokens, or its error."""

    def __init__(self, running, prompt: list[int], max_tokens: int, request_id: str = "", trace_id: str = ""):
        self.tokens: list[int] = []
        self.error: str | None = None
        request = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=prompt), request_id=request_id,
            sampling=inference_pb2.SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        metadata = (("authorization", f"Bearer {API_KEY}"),)
        if trace_id:
            metadata += (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
        self.thread = threading.Thread(target=self._run, args=(running.grpc_address, request, metadata), daemon=True)
        self.thread.start()

    def _run(self, address: str, request, metadata) -> None:
        with grpc.insecure_channel(address) as channel:
            try:
                for reply in inference_pb2_grpc.InferenceStub(channel).Generate(request, metadata=metadata,
                                                                                 timeout=BOUND_S):
                    self.tokens += reply.token_ids
            except grpc.RpcError as e:
                self.error = f"{e.code().name}: {e.details()}"

    def result(self) -> list[int]:
        self.thread.join(BOUND_S)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.tokens


def wait_for(what: str, check):
    end = time.monotonic() + BOUND_S
    while not (value := check()):
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what} after {BOUND_S} s")
        time.sleep(0.02)
    return value


@dataclass
class Script:
    """The test's load on a gateway whose load window and controller read `clock`: an interval
    lasts as long as the test moves the clock between two rounds (TTFT and TPOT stay on the
    service's own clock)."""
    running: Running
    clock: FakeClock
    fault_log: str
    reference: Callable[[list[int], int], list[int]]  # the engine alone's greedy tokens

    def __post_init__(self):
        from gateway.observe import LoadWindow

        gw = self.running.gateway
        slos = {n: s.spec.slo for n, s in gw.fleet.scenarios.items()}
        gw.service.load = gw.control.window = LoadWindow(slos, self.clock)
        gw.control.clock = self.clock

    def interval(self, seconds: float, requests=(), held: tuple[str, list[int]] | None = None,
                 meanwhile=lambda: None) -> Stream | None:
        """One control interval of `seconds`, with `requests` ((prompt, max_tokens) each, all
        ended within it, with the engine's tokens) and, when `held` (request id, prompt) is given, a request that stops
        mid-flight on its actor: the round then runs while it is held there, `meanwhile()` is
        called once the round's switch is draining that actor, and then the actor resumes.
        Returns the held request's stream."""
        for prompt, max_tokens in requests:
            assert Stream(self.running, prompt, max_tokens).result() == self.reference(prompt, max_tokens)
        stream = None
        if held:
            rid, prompt = held
            stream = Stream(self.running, prompt, HELD_TOKENS, rid, HELD[rid])
            [fired] = wait_for(f"{rid} to stop", lambda: [f for f in read_log(self.fault_log) if f.request == rid])
            member = self.running.gateway.fleet.scenarios["s"].pool.members[fired.actor]
            pid = member.info.pid
        self.clock.now += seconds
        round_ = asyncio.run_coroutine_threadsafe(self.running.gateway.control.tick(), self.running.loop)
        if held:
            wait_for(f"the switch to drain {fired.actor}", lambda: member.info.state is ActorState.DRAINING)
            try:
                meanwhile()
            finally:
                os.kill(pid, signal.SIGCONT)
        round_.result(BOUND_S)
        return stream


def moved_from(otlp, rid: str) -> list[str]:
    """The actors that gave the request back (mesh.dispatch's "moved" events on its gateway span)."""
    def span():
        return next((s for _, s in otlp.of_trace(bytes.fromhex(HELD[rid])) if s.name == "gateway.generate"), None)
    return [{a.key: a.value.string_value for a in e.attributes}["actor"]
            for e in wait_for(f"the span of {rid}", span).events if e.name == "moved"]


def placements(running) -> dict[str, float]:
    _, body = http(running, "/metrics")
    return {line.split('decision="')[1].split('"')[0]: float(line.split()[-1]) for line in body.decode().splitlines()
            if line.startswith("pdmesh:placements_total{")}


def test_the_controller_switches_modes_under_load_and_loses_no_request(switching, fault_log, reference, otlp,
                                                                        tmp_path):
    running = switching
    script = Script(running, FakeClock(1000.0), fault_log, reference)
    pool = running.gateway.fleet.scenarios["s"].pool

    def pdmesh(*args):
        return cli(running, tmp_path, *args)

    def roles() -> list[str]:
        return sorted(m.role.value for m in pool.members.values())

    # light: a short request in 1000 s, twice (ModeSettings.confirm), the second time with a
    # long one held in the prefill actor's queue (the decode actor holds its KV lease), which
    # the switch flips first: aggregated
    script.interval(1000, [(SHORT, 8)])
    assert pool.mode is Mode.AUTO and roles() == ["decode", "prefill"]
    decode = pool.by_role(Role.DECODE)[0].actor_id
    prefill = pool.by_role(Role.PREFILL)[0].actor_id
    seen = {}

    def during_the_switch():  # calls that touch no actor: the held one answers nothing meanwhile
        seen["ready"] = running.gateway.fleet.not_ready()
        seen["shown"] = pdmesh("ratio", "show", "s")[1]
        seen["flip"] = pdmesh("flip", decode, "both")

    held = script.interval(1000, [(SHORT, 8)], held=("held-1", LONG), meanwhile=during_the_switch)
    assert [f.actor for f in read_log(fault_log)] == [prefill]
    assert held.result() == reference(LONG, HELD_TOKENS)
    # given back by the prefill actor's drain; once more when the switch drains the decode
    # actor it went on with
    assert moved_from(otlp, "held-1")[0] == prefill
    assert "aggregated (auto, switching)" in seen["shown"]
    assert seen["ready"] == []  # health stays SERVING: while it switches, the decode actor serves whole requests
    code, _, err = seen["flip"]  # no flip while the switch's own are under way
    assert code == 1 and err == (f"pdmesh: error: cannot flip {decode} to both: scenario 's' is switching to "
                                 "aggregated mode, its actors flipping one at a time: try again once `pdmesh status` "
                                 "no longer shows it switching\n")
    assert pool.mode is Mode.AGGREGATED and roles() == ["both", "both"]

    [scenario] = ok_json(pdmesh, "status")["scenarios"]
    assert (scenario["mode"], scenario["configured_mode"], scenario["both"]) == ("aggregated", "auto", 2)
    assert "aggregated (auto)" in pdmesh("status")[1]
    code, out, err = pdmesh("flip", decode, "decode", "--output", "json")
    assert code == 1 and first_json(out)["error"]["status"] == "FAILED_PRECONDITION"
    assert err == (f"pdmesh: error: cannot flip {decode} to decode: scenario 's' serves aggregated now, its actors "
                   "running whole requests as both (its mode is auto: the controller splits it again under load); "
                   "use both\n")

    # quiet past the dwell (ModeSettings.min_dwell_s), then long prompts arriving 1000 a second,
    # twice, the second time with a request held on a both actor: split again
    script.interval(100)
    script.interval(0.002, [(LONG, 8), (LONG, 8)])
    assert pool.mode is Mode.AGGREGATED
    held = script.interval(0.002, held=("held-2", LONG))
    assert held.result() == reference(LONG, HELD_TOKENS)
    [_, fired] = read_log(fault_log)
    assert fired.point == "decode_step"
    # given back by the held actor's drain; once more when the switch flips the actor it went
    # on with, if that one is flipped after it
    assert moved_from(otlp, "held-2")[0] == fired.actor
    assert pool.mode is Mode.AUTO and roles() == ["decode", "prefill"]
    assert all(m.info.state is ActorState.SERVING for m in pool.members.values())

    # auto again: short prompts local, long ones to the prefill actor
    before = placements(running)
    assert [Stream(running, p, 8).result() for p in (SHORT, LONG)] == [reference(SHORT, 8), reference(LONG, 8)]
    after = placements(running)
    assert {k: after[k] - before.get(k, 0) for k in after} == {"local": 1, "remote": 1}

    decisions = ok_json(pdmesh, "decisions", "--scenario", "s")["decisions"]
    assert [(d["action"], d["current_mode"], d["target_mode"], d["failures"]) for d in decisions] == [
        ("switch", "auto", "aggregated", []), ("switch", "aggregated", "auto", [])]
    assert "at or below 0.4, SLOs met: auto -> aggregated" in decisions[0]["reason"]
    assert decisions[1]["reason"].endswith("at or above 0.8: aggregated -> auto: 1P:1D")
    assert (decisions[1]["target_prefill"], decisions[1]["target_decode"]) == (1, 1)
    table = pdmesh("decisions")[1]
    assert "s  auto -> aggregated  load" in table and "s  aggregated -> auto  load" in table
    code, _, err = pdmesh("flip", pool.by_role(Role.DECODE)[0].actor_id, "both")
    assert code == 1 and "serves in auto mode now, its actors serving as prefill or decode (the controller " \
                         "aggregates it while the load is light); use prefill or decode" in err
    assert_no_blocks_held(running)
