"""Serving modes on a live pool (mesh.serving_mode): every mode gives the tokens of the engine alone;
auto keeps short prompts on the decode actor and sends long ones to a prefill actor; a switch
of the whole pool between modes, under load, loses no request."""
from __future__ import annotations

import asyncio

import pytest

from mesh.api import ActorState, Role, SamplingParams
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from mesh.serving_mode import ConditionalDisaggregation, Mode
from tests.mesh.support import assert_no_blocks_held

GREEDY = {"temperature": 0, "ignore_eos": True}
SHORT, LONG = [7] * 6, [3 + i % 50 for i in range(40)]


@pytest.fixture(scope="module")
def pool(make_pool):
    """One actor of each role: which serves a request is the mode's choice alone."""
    return make_pool(prefill=1, decode=1, both=1)


async def run(dispatcher: Dispatcher, rid: str, prompt: list[int], max_tokens: int = 12):
    events, tokens = [], []
    async for chunk in dispatcher.generate(Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY)),
                                           events):
        tokens += chunk.token_ids
    return tokens, events


def ran_on(events) -> set[str]:
    """The actors that computed the request: placed whole, or prefilled and decoded."""
    found = set()
    for e in events:
        if e.name == "placed":
            found.add(e.attributes["actor"])
        elif e.name == "first_token":
            found |= {e.attributes["prefill"], e.attributes["decode"]}
    return found


@pytest.mark.parametrize("mode, role", [(Mode.AGGREGATED, Role.BOTH), (Mode.DISAGGREGATED, None)])
async def test_each_mode_gives_the_tokens_of_the_engine_alone(pool, reference, mode, role):
    pool.mode = mode
    try:
        tokens, events = await run(Dispatcher(pool), f"m-{mode}", LONG)
    finally:
        pool.mode = Mode.DISAGGREGATED
    assert tokens == reference(LONG, 12)
    want = ({pool.by_role(Role.BOTH)[0].actor_id} if role else
            {pool.by_role(Role.PREFILL)[0].actor_id, pool.by_role(Role.DECODE)[0].actor_id})
    assert ran_on(events) == want
    await assert_no_blocks_held(pool)


async def test_auto_prefills_short_prompts_on_the_decode_actor_and_long_ones_on_a_prefill_actor(pool, reference):
    pool.mode = Mode.AUTO
    dispatcher = Dispatcher(pool, conditional=ConditionalDisaggregation(local_prefill_tokens=16))
    try:
        short, short_events = await run(dispatcher, "auto-short", SHORT)
        long, long_events = await run(dispatcher, "auto-long", LONG)
    finally:
        pool.mode = Mode.DISAGGREGATED
    prefill, decode = pool.by_role(Role.PREFILL)[0].actor_id, pool.by_role(Role.DECODE)[0].actor_id
    assert (short, long) == (reference(SHORT, 12), reference(LONG, 12))
    [placed] = [e.attributes for e in short_events if e.name == "placement"]
    assert placed["decision"] == "local" and placed["reason"].startswith("short prompt: 6 uncached tokens")
    assert ran_on(short_events) == {decode}
    [placed] = [e.attributes for e in long_events if e.name == "placement"]
    assert placed["decision"] == "remote" and placed["reason"].startswith("long prompt: 40 uncached tokens")
    assert ran_on(long_events) == {prefill, decode}
    await assert_no_blocks_held(pool)


@pytest.fixture(scope="module")
def split(make_pool):
    return make_pool(prefill=1, decode=1)


async def test_switching_modes_under_load_loses_no_request(split, reference):
    dispatcher = Dispatcher(split, conditional=ConditionalDisaggregation(local_prefill_tokens=16))
    prompts = [[5 + i] * (6 + 7 * i) for i in range(4)]  # short and long: local and remote in auto

    async def under_load(switch) -> None:
        """Requests in flight (each streamed its first tokens) when the switch starts; all end
        with the engine's tokens."""
        started = [asyncio.Event() for _ in prompts]

        async def one(i, name=""):
            tokens = []
            request = Request(f"sw{id(switch)}-{name or i}", prompts[i], SamplingParams(max_tokens=40, **GREEDY))
            async for chunk in dispatcher.generate(request):
                tokens += chunk.token_ids
                started[i].set()
            return tokens

        tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
        await asyncio.gather(*(e.wait() for e in started))
        assert not any(t.done() for t in tasks)
        await switch()
        # and one that arrives after it, with an id of its own (request 0 may still be in flight)
        later = asyncio.create_task(one(0, "later"))
        assert await asyncio.gather(*tasks, later) == [reference(p, 40) for p in prompts] + [reference(prompts[0], 40)]

    await under_load(lambda: split.switch_mode(Mode.AGGREGATED))
    assert [m.role for m in split.members.values()] == [Role.BOTH, Role.BOTH] and split.mode is Mode.AGGREGATED
    await under_load(lambda: split.switch_mode(Mode.AUTO, prefill=1))
    assert sorted(m.role.value for m in split.members.values()) == ["decode", "prefill"]
    assert all(m.info.state is ActorState.SERVING for m in split.members.values())
    await assert_no_blocks_held(split)
