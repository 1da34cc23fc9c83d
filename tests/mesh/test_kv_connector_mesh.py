"""Layer-wise KV sending across real actors on a local Ray: requests served disaggregated with
each layer sent as the prefill computes it give the engine's tokens, report how long the
transfer ran past the first token, and leave no KV block held (the streaming itself is proven
in test_kv_connector.py, where a hook holds the prefill's last layer)."""
from __future__ import annotations

import pytest

from mesh.api import SamplingParams
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from tests.mesh.support import assert_no_blocks_held

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def pool(make_pool):
    return make_pool(prefill=1, decode=1, layerwise_kv=True)


@pytest.mark.parametrize("rid, prompt, max_tokens", [
    ("lw-long", list(range(30, 190)), 6),    # 40 blocks, one prefill step
    ("lw-short", [5, 6, 7], 4),
    ("lw-one", list(range(60, 100)), 1),     # ends at its first token: the started stream stops
])
async def test_layerwise_requests_decode_exactly_and_free_every_block(pool, reference, rid, prompt, max_tokens):
    events, tokens = [], []
    async for chunk in Dispatcher(pool).generate(Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY)), events):
        tokens += chunk.token_ids
    assert tokens == reference(prompt, max_tokens)
    transfers = [e.attributes for e in events if e.name == "kv_transfer"]
    assert not [e for e in events if e.name in ("retry", "transfer_failed", "actor_lost")], events
    if max_tokens > 1:
        [transfer] = transfers
        assert transfer["layers"] == 2 and transfer["exposed_s"] >= 0
    else:
        assert transfers == []
    await assert_no_blocks_held(pool)
