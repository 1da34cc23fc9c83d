"""Actors killed at a named point of a request (mesh.faults): during prefill, after one layer
of KV went on the wire, at a decode step, and every decode actor at once. The request
completes with every token exactly once (or fails cleanly by its deadline), the supervisor
replaces the dead actor, and no KV block stays allocated anywhere.

Each fault is scoped to one request id; the dispatcher's retries run under ids of their own,
so a fault fires once, and the fault log says where."""
from __future__ import annotations

import asyncio

import pytest

from mesh.api import Role
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from mesh.engine.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.engine.sampling_params import SamplingParams
from mesh.errors import MeshError
from mesh.faults import Fired, read_log
from tests.mesh.support import assert_no_blocks_held, killed, replaced, supervised
from tests.support.clock import FakeClock

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPT = list(range(3, 123))  # prefilled in 8 steps of 16 tokens
MAX_TOKENS = 24
FAULTS = ";".join(["kill:prefill@request=f-prefill", "kill:transfer_after_layers=1@request=f-transfer",
                   "kill:decode_step=3@request=f-decode", "kill:decode_step=3@request=f-late",
                   "kill:decode_step=3@request=f-move"])


@pytest.fixture(scope="module")
def fault_log(tmp_path_factory):
    return str(tmp_path_factory.mktemp("faults") / "fired.jsonl")


@pytest.fixture(scope="module")
def pool(make_pool, fault_log):
    return make_pool(prefill=2, decode=2, max_num_batched_tokens=16, faults=FAULTS, fault_log=fault_log)


@pytest.fixture(scope="module")
def expected(checkpoint):
    engine = Engine(EngineConfig(model=str(checkpoint("llama", "float32")), dtype="float32", num_blocks=128))
    return engine.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, **GREEDY))[0].token_ids


async def run(pool, rid: str, deadline: float = float("inf")) -> tuple[list[int], list]:
    events, tokens = [], []
    async for chunk in Dispatcher(pool).generate(Request(rid, PROMPT, SamplingParams(max_tokens=MAX_TOKENS, **GREEDY),
                                                         deadline=deadline), events):
        tokens += chunk.token_ids
    return tokens, events


def fired(fault_log: str, rid: str) -> Fired:
    [hit] = [f for f in read_log(fault_log) if f.request == rid]
    return hit


@pytest.mark.parametrize("rid, point, role, phase", [
    ("f-prefill", "prefill", Role.PREFILL, "prefill"),
    ("f-transfer", "transfer_after_layers", Role.PREFILL, "transfer"),
    ("f-decode", "decode_step", Role.DECODE, "decode"),
])
async def test_killed_at_a_fault_point(pool, expected, fault_log, rid, point, role, phase):
    async with supervised(pool):
        tokens, events = await run(pool, rid)
        assert tokens == expected  # a retry re-prefills from prompt + tokens sent: no gap, no repeat
        hit = fired(fault_log, rid)
        assert hit.point == point and hit.actor.startswith(f"{pool.spec.scenario}-{role.value[0]}")
        [lost] = [e for e in events if e.name == "actor_lost"]
        assert lost.attributes["actor"] == hit.actor and lost.attributes["phase"] == phase
        if point == "decode_step":
            assert hit.n >= 3  # killed before sending its 3rd token: the tokens before it came once
        if point == "transfer_after_layers":
            assert hit.n == 1
        await replaced(pool, hit.actor)
    assert len(pool.by_role(Role.PREFILL)) == 2 and len(pool.by_role(Role.DECODE)) == 2
    await assert_no_blocks_held(pool)


async def test_a_retry_is_admitted_until_the_request_deadline(pool, expected, fault_log):
    """The retry after a decode loss comes long after the first attempt's admission deadline
    (here: the clock jumps a minute once the first token is out); it is offered to the prefill
    actors all the same, within the request's own deadline."""
    clock = FakeClock(1000.0)
    dispatcher = Dispatcher(pool, clock=clock)
    request = Request("f-late", PROMPT, SamplingParams(max_tokens=MAX_TOKENS, **GREEDY), deadline=clock.now + 3600,
                      admission_deadline=clock.now + 5)
    events, tokens = [], []
    async with supervised(pool):
        async for chunk in dispatcher.generate(request, events):
            tokens += chunk.token_ids
            clock.now = 1060.0
        assert tokens == expected
        assert fired(fault_log, "f-late").point == "decode_step"
        assert [e.attributes["phase"] for e in events if e.name == "actor_lost"] == ["decode"]
        await replaced(pool, fired(fault_log, "f-late").actor)
    await assert_no_blocks_held(pool)


async def test_every_decode_actor_dead_at_once(pool, expected):
    async with supervised(pool):
        dead = await killed(pool, Role.DECODE)
        assert not pool.by_role(Role.DECODE) and pool.replacing(Role.DECODE)
        # a request whose deadline comes before any replacement serves fails cleanly, in time
        loop = asyncio.get_running_loop()
        with pytest.raises(MeshError) as failed:
            await run(pool, "too-soon", deadline=loop.time() + 0.5)
        assert failed.value.code == "unavailable" and "no live decode actor" in failed.value.message
        # the others wait for the replacements and finish
        results = await asyncio.gather(*(run(pool, f"waits{i}") for i in range(3)))
        for tokens, events in results:
            assert tokens == expected
            assert any(e.name == "waiting_for_actor" and e.attributes["role"] == "decode" for e in events)
        for member in dead:
            await replaced(pool, member.actor_id)
    await assert_no_blocks_held(pool)


async def test_a_request_goes_on_after_failover_as_if_it_never_moved(pool, checkpoint, fault_log):
    """Its decode actor killed at step 3 with a stop string (its last characters held back) and
    seeded sampling: the retry computes the sent tokens with the prompt and goes on from them,
    so text and tokens equal one engine's."""
    params = {"max_tokens": MAX_TOKENS, "temperature": 0.9, "seed": 7, "stop": ["zzzz"], "ignore_eos": True}
    engine = Engine(EngineConfig(model=str(checkpoint("llama", "float32")), dtype="float32", num_blocks=128))
    [want] = engine.generate([PROMPT], SamplingParams(**params))
    events, tokens, text = [], [], ""
    async with supervised(pool):
        async for chunk in Dispatcher(pool).generate(Request("f-move", PROMPT, SamplingParams(**params)), events):
            tokens += chunk.token_ids
            text += chunk.text
        hit = fired(fault_log, "f-move")
        assert hit.point == "decode_step"
        assert [e.attributes["phase"] for e in events if e.name == "actor_lost"] == ["decode"]
        assert (tokens, text) == (want.token_ids, want.text)
        await replaced(pool, hit.actor)
    await assert_no_blocks_held(pool)
