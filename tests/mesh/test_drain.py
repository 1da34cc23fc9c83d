"""Drains and flips that run out of time: the requests still on the actor are given back
(their streams end with RequestMoved at once, their KV freed) and finish on other actors
with every token once."""
from __future__ import annotations

import asyncio

import pytest

from mesh.api import ActorRequest, ActorState, Role
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from mesh.engine.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.engine.sampling_params import SamplingParams
from mesh.errors import RequestMoved
from mesh.token_feed import Feeds
from tests.mesh.support import assert_no_blocks_held

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPTS = [[5 + i] * (10 + i) for i in range(3)]
MAX_TOKENS = 200  # far more than a drain of DRAIN_S lets finish: each request is still running then
DRAIN_S = 0.01


@pytest.fixture(scope="module")
def pool(make_pool):
    return make_pool(prefill=1, decode=2, num_blocks=512)


@pytest.fixture(scope="module")
def expected(checkpoint):
    engine = Engine(EngineConfig(model=str(checkpoint("llama", "float32")), dtype="float32", num_blocks=512))
    params = SamplingParams(max_tokens=MAX_TOKENS, **GREEDY)
    return [out.token_ids for out in engine.generate(PROMPTS, params)]


async def test_a_drain_that_times_out_ends_the_stream_with_request_moved_and_frees_its_kv(pool):
    actor = pool.by_role(Role.DECODE)[0]
    feeds = Feeds()
    feed = feeds.of(actor.actor_id, actor.handle)
    request = ActorRequest("given-back", PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS, **GREEDY))
    stream = feed.follow(request.request_id, actor.handle.generate.remote(request, feed.feed_id))
    first = await stream.__anext__()
    assert not first.finished
    assert (await actor.handle.drain.remote(DRAIN_S)).moved == ("given-back",)
    with pytest.raises(RequestMoved, match="gave the request back: its drain timed out"):
        async for _ in stream:
            pass
    # a new request reaching the drained actor moves on at once, too
    late = ActorRequest("late", PROMPTS[1], SamplingParams(max_tokens=4, **GREEDY))
    with pytest.raises(RequestMoved, match="is draining as decode"):
        await feed.follow(late.request_id, actor.handle.generate.remote(late, feed.feed_id)).__anext__()
    await feeds.close()
    await assert_no_blocks_held(pool)
    result = await pool.flip(actor.actor_id, Role.DECODE)  # serves again
    assert result.report.state is ActorState.SERVING and result.moved == ()


async def test_a_flip_that_times_out_moves_its_requests_and_they_finish_elsewhere(pool, expected):
    dispatcher = Dispatcher(pool)
    started = [asyncio.Event() for _ in PROMPTS]
    events = [[] for _ in PROMPTS]

    async def one(i):
        tokens = []
        request = Request(f"flip-moved-{i}", PROMPTS[i], SamplingParams(max_tokens=MAX_TOKENS, **GREEDY))
        async for chunk in dispatcher.generate(request, events[i]):
            tokens += chunk.token_ids
            if len(tokens) > 1:  # decoding on its decode actor
                started[i].set()
        return tokens

    # every request decodes on the same actor: the other one is drained while they start
    victim, other = pool.by_role(Role.DECODE)
    await pool.drain(other.actor_id)
    tasks = [asyncio.create_task(one(i)) for i in range(len(PROMPTS))]
    for e in started:
        await asyncio.wait_for(e.wait(), 120)
    await pool.flip(other.actor_id, Role.DECODE)
    flipped = await pool.flip(victim.actor_id, Role.PREFILL, drain_timeout_s=DRAIN_S)
    results = await asyncio.gather(*tasks)

    assert sorted(flipped.moved) == [f"flip-moved-{i}" for i in range(len(PROMPTS))]
    assert results == expected  # every token once, in order
    for evs in events:
        assert [e.attributes["reason"] for e in evs if e.name == "moved"] != []
        assert not any(e.name == "actor_lost" for e in evs)
    await pool.flip(victim.actor_id, Role.DECODE)
    await assert_no_blocks_held(pool)


async def test_a_drain_waits_for_leases_whose_prefill_is_on_its_way(pool):
    actor = pool.by_role(Role.DECODE)[0]
    lease = await actor.handle.reserve.remote(PROMPTS[0])
    drain = asyncio.ensure_future(actor.handle.drain.remote(60.0))
    await asyncio.sleep(0.5)
    assert not drain.done()  # the lease's KV may still come, and its decode call after it
    await actor.handle.release_lease.remote(lease.lease_id)
    assert (await drain).moved == ()
    await pool.flip(actor.actor_id, Role.DECODE)
    await assert_no_blocks_held(pool)
