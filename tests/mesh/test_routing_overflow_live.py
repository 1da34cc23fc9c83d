"""Cross-scenario overflow on a real local Ray: a scenario whose only prefill actor is held
busy (mesh.faults' stop point: its process stops in a held request's prefill, so it answers
no offer) gets its request prefilled by another scenario's prefill actor, decoded by its own
decode actor, with the tokens of the engine alone; the request's events name the host."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from mesh.api import Role, SamplingParams
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from mesh.faults import read_log
from mesh.routing import CrossScenarioOverflow, ForwardOnRejection, Neighbour
from tests.mesh.support import assert_no_blocks_held

PROMPT = [3 + i % 40 for i in range(24)]
HELD = [7 + i % 30 for i in range(32)]
BOUND_S = 120  # on each wait: a bound that turns a hang into a failure


@pytest.fixture(scope="module")
def fault_log(tmp_path_factory):
    return str(tmp_path_factory.mktemp("overflow") / "fired.jsonl")


@pytest.fixture(scope="module")
def pools(make_pool, fault_log):
    home = make_pool(prefill=1, decode=1, faults="stop:prefill@request=held", fault_log=fault_log)
    host = make_pool(prefill=1, decode=1)
    return home, host


async def _tokens(dispatcher: Dispatcher, req: Request, events: list) -> list[int]:
    out = []
    async for chunk in dispatcher.generate(req, events):
        out.extend(chunk.token_ids)
    return out


def _greedy(request_id: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


async def _stopped(fault_log: str, request_id: str):
    deadline = time.monotonic() + BOUND_S
    while not (fired := [f for f in read_log(fault_log) if f.request == request_id]):
        assert time.monotonic() < deadline, f"{request_id} did not stop within {BOUND_S}s"
        await asyncio.sleep(0.05)
    return fired[0]


def test_a_request_its_busy_pool_refuses_is_prefilled_by_another_scenarios_actor(pools, fault_log, reference):
    home, host = pools
    neighbours = [Neighbour("host", 0, 600.0, host)]
    # a short offer timeout: the held actor's process is stopped, so its offers are never answered
    dispatcher = Dispatcher(home, ForwardOnRejection(max_forwards=2, offer_timeout_s=1.0),
                            overflow=CrossScenarioOverflow(), neighbours=lambda: neighbours)
    [held_actor] = home.by_role(Role.PREFILL)
    [host_actor] = host.by_role(Role.PREFILL)
    [home_decode] = home.by_role(Role.DECODE)

    async def run():
        held_events: list = []
        held = asyncio.create_task(_tokens(dispatcher, _greedy("held", HELD, 4), held_events))
        fired = await _stopped(fault_log, "held")
        assert fired.actor == held_actor.actor_id
        try:
            events: list = []
            tokens = await asyncio.wait_for(_tokens(dispatcher, _greedy("r", PROMPT, 6), events), BOUND_S)
        finally:
            os.kill(held_actor.info.pid, signal.SIGCONT)
        return tokens, events, await asyncio.wait_for(held, BOUND_S), held_events

    tokens, events, held_tokens, held_events = asyncio.run(run())
    assert tokens == reference(PROMPT, 6)
    assert held_tokens == reference(HELD, 4)
    rejected = [e.attributes for e in events if e.name == "prefill_rejected"]
    assert rejected and all(a["actor"] == held_actor.actor_id and "no answer" in a["reason"] for a in rejected)
    [accepted] = [e.attributes for e in events if e.name == "prefill_accepted"]
    assert accepted["actor"] == host_actor.actor_id and accepted["forwarded_to_scenario"] == "host"
    [reserved] = [e.attributes for e in events if e.name == "decode_reserved"]
    assert reserved["actor"] == home_decode.actor_id  # the decode stays in the request's own pool
    [transfer] = [e.attributes for e in events if e.name == "kv_transfer"]
    assert (transfer["prefill"], transfer["decode"]) == (host_actor.actor_id, home_decode.actor_id)
    assert not any("forwarded_to_scenario" in e.attributes for e in held_events)
    asyncio.run(assert_no_blocks_held(home))
    asyncio.run(assert_no_blocks_held(host))


def test_without_the_policy_the_busy_pool_refuses_and_no_other_pool_is_asked(pools):
    home, host = pools
    dispatcher = Dispatcher(home, ForwardOnRejection(max_forwards=1, offer_timeout_s=0.0),
                            neighbours=lambda: [Neighbour("host", 0, 600.0, host)])
    events: list = []
    with pytest.raises(Exception) as raised:
        asyncio.run(_tokens(dispatcher, _greedy("r2", PROMPT, 2), events))
    assert getattr(raised.value, "code", None) == "resource_exhausted"
    assert [e.name for e in events if e.name.startswith("prefill_")] == ["prefill_rejected"]
