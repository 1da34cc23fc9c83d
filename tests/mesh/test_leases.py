"""A decode lease outlives its time to live while its prefill has not started: the dispatcher
renews it, so a long prompt under load keeps its lease and its KV arrives (no failed
transfer, no retry). The wait is made certain here: the offer to the prefill actor comes
three TTLs after the reservation, as behind a long prefill queue."""
from __future__ import annotations

import asyncio

import pytest

from mesh.api import SamplingParams
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from tests.mesh.support import assert_no_blocks_held

GREEDY = {"temperature": 0, "ignore_eos": True}
TTL_S = 2.0  # once the prefill starts, its KV must land within one TTL: 0.5 s was missed on a loaded 2-core CI run


class QueuedDispatcher(Dispatcher):
    async def _offer(self, step, lost, events):
        await asyncio.sleep(3 * TTL_S)  # the prefill pool is busy for three of the lease's lifetimes
        return await super()._offer(step, lost, events)


@pytest.fixture(scope="module")
def pool(make_pool):
    return make_pool(prefill=1, decode=1, lease_ttl_s=TTL_S)


async def test_a_lease_is_renewed_while_its_prefill_waits(pool, reference):
    prompt = list(range(30, 130))
    events, tokens = [], []
    request = Request("queued", prompt, SamplingParams(max_tokens=6, **GREEDY))
    async for chunk in QueuedDispatcher(pool).generate(request, events):
        tokens += chunk.token_ids
    assert tokens == reference(prompt, 6)
    assert not [e for e in events if e.name in ("retry", "transfer_failed", "actor_lost")], events
    assert [e.name for e in events].count("kv_transfer") == 1
    await assert_no_blocks_held(pool)
