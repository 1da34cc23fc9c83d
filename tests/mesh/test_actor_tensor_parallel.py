"""Mesh actors spanning tensor-parallel ranks, on a real local Ray with real UCX on loopback (CPU,
gloo): a prefill at TP=2 into a decode at TP=1, and TP=1 into TP=2, give the engine alone's
greedy tokens. Each rank's KV heads move from its own pool into the pools of the receiving
ranks that hold them: the lease comes in one part per receiving rank and head range, and
every byte of the prompt's KV crosses once."""
from __future__ import annotations

import pytest

from mesh.dispatch import Dispatcher, Request
from mesh.hardware import Hardware
from mesh.api import Role, SamplingParams
from tests.mesh.support import assert_no_blocks_held

GREEDY = {"temperature": 0, "ignore_eos": True}
KV_HEADS, HEAD_DIM, LAYERS = 2, 16, 2  # the tiny llama's


async def generate(pool, rid: str, prompt: list[int], max_tokens: int) -> tuple[list[int], dict]:
    events = []
    tokens = []
    async for chunk in Dispatcher(pool).generate(Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY)),
                                                 events):
        tokens += chunk.token_ids
    return tokens, next(e for e in events if e.name == "kv_transfer").attributes


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["prefill-tp2-decode-tp1", "prefill-tp1-decode-tp2"])
def tp_pool(request, make_pool):
    """A 1P:1D pool, each role at its tensor-parallel size, with the sizes."""
    prefill_tp, decode_tp = request.param
    return make_pool(prefill=1, decode=1, hardware={"prefill": Hardware(tensor_parallel_size=prefill_tp),
                                                    "decode": Hardware(tensor_parallel_size=decode_tp)}), request.param


async def test_a_mesh_across_tensor_parallel_degrees_gives_the_engine_alones_tokens(tp_pool, reference):
    pool, (prefill_tp, decode_tp) = tp_pool
    assert [m.info.tensor_parallel_size for m in (*pool.by_role(Role.PREFILL), *pool.by_role(Role.DECODE))] \
        == [prefill_tp, decode_tp]
    for n, prompt in enumerate([list(range(40, 77)), list(range(3, 12))]):
        tokens, transfer = await generate(pool, f"tp{n}", prompt, 16)
        assert tokens == reference(prompt, 16)
        # one part per KV head (each rank of the TP=2 side holds one), moved as that head only: strided
        # in the TP=1 pool, so gathered; together every byte of the prompt's KV, once
        assert transfer["strategy"] == "gather"
        assert transfer["bytes"] == LAYERS * 2 * len(prompt) * KV_HEADS * HEAD_DIM * 4
    await assert_no_blocks_held(pool)
