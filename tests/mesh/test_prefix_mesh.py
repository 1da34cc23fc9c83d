"""Prefix reuse across the mesh on a real local Ray: the decode actor keeps its own prefix cache
and the transfer skips what it holds; offers go to the prefill actor holding the prompt's prefix."""
from __future__ import annotations

import dataclasses

import pytest

from mesh.api import LoadReport, Role, SamplingParams
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from tests.mesh.support import assert_no_blocks_held

GREEDY = {"temperature": 0, "ignore_eos": True}
BLOCK = 4  # make_pool's engines


@pytest.fixture(scope="module")
def pool(make_pool):
    return make_pool(prefill=2, decode=1)


async def run(dispatcher, rid, prompt, max_tokens=6):
    events, tokens = [], []
    request = Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
    async for chunk in dispatcher.generate(request, events):
        tokens += chunk.token_ids
    return tokens, {e.name: e.attributes for e in events}


async def test_a_prefix_the_decode_actor_holds_is_not_sent_again(pool, reference):
    shared = list(range(400, 440))  # 10 blocks
    first, second = shared + [5, 6, 7], shared + [9, 8, 7, 6, 5]
    dispatcher = Dispatcher(pool)
    tokens, events = await run(dispatcher, "hit-1", first)
    assert tokens == reference(first, 6)
    assert events["decode_reserved"]["prefix_tokens"] == 0
    full = events["kv_transfer"]["bytes"]
    per_token = full // len(first)
    assert full == per_token * len(first) and events["kv_transfer"]["skipped_tokens"] == 0

    tokens, events = await run(dispatcher, "hit-2", second)
    assert tokens == reference(second, 6)
    assert events["decode_reserved"]["prefix_tokens"] == len(shared)
    assert events["decode_reserved"]["prefix_blocks"] == len(shared) // BLOCK
    assert events["kv_transfer"]["skipped_tokens"] == len(shared)
    # exactly the shared prefix's bytes fewer than the whole prompt's
    assert events["kv_transfer"]["bytes"] == per_token * len(second) - per_token * len(shared)
    await assert_no_blocks_held(pool)


async def test_held_prefix_blocks_go_back_when_a_lease_is_released_or_expires(pool):
    shared = list(range(600, 632))  # 8 blocks
    await run(Dispatcher(pool), "cache-it", shared + [1])
    decode = pool.by_role(Role.DECODE)[0]
    for end in ("release", "expiry"):
        lease = await decode.handle.reserve.remote(shared + [2, 3, 4, 5, 6], BLOCK)
        assert lease.prefix_tokens == len(shared) and lease.prefix_blocks == 8
        load = (await decode.handle.info.remote()).load
        assert load.used_blocks == 8 + 2  # the held prefix and a lease of 5 tokens
        if end == "release":
            assert await decode.handle.release_lease.remote(lease.lease_id)
        await assert_no_blocks_held(pool, wait_s=20.0)  # an unused lease expires after lease_ttl_s


async def test_a_request_goes_to_the_prefill_actor_holding_its_prefix_and_prefills_only_its_suffix(
        pool, reference):
    prefix = list(range(200, 328))  # two chunks of the actors' prefix reports, 32 blocks
    first, second = prefix + [1, 2, 3], prefix + [4, 5, 6, 7, 8]
    p0, p1 = pool.by_role(Role.PREFILL)
    p0.info = dataclasses.replace(p0.info, load=LoadReport(queued_requests=5))  # idle-first sends it to p1
    tokens, events = await run(Dispatcher(pool), "route-1", first)
    assert tokens == reference(first, 6)
    assert events["prefill_accepted"]["actor"] == p1.actor_id
    assert events["prefill_accepted"]["order"] == "idle"

    await pool.refresh()  # both idle again; p1's report now names the prefix
    assert p0.info.load.queued_requests == p1.info.load.queued_requests == 0
    hits_before = p1.info.load.prefix_cache.hits
    tokens, events = await run(Dispatcher(pool), "route-2", second)  # a new dispatcher: only the reports
    assert tokens == reference(second, 6)
    accepted = events["prefill_accepted"]
    assert accepted["actor"] == p1.actor_id and accepted["order"] == "prefix"
    assert accepted["expected_prefix_tokens"] == len(prefix)
    await pool.refresh()
    assert p1.info.load.prefix_cache.hits - hits_before == len(prefix) // BLOCK  # only the suffix ran
    assert events["decode_reserved"]["prefix_tokens"] == len(prefix)  # and the decode actor held it too
    await assert_no_blocks_held(pool)
