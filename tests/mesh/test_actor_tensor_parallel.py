"""Mesh actors spanning tensor-parallel ranks, on a real local Ray with real UCX on loopback (CPU,
gloo): a prefill at TP=2 into a decode at TP=1, and TP=1 into TP=2, give the engine alone's
greedy tokens. Each rank's KV heads move from its own pool into the pools of the receiving
ranks that hold them: the lease comes in one part per receiving rank and head range, and
every byte of the prompt's KV crosses once. A worker rank killed at a fault point takes its
actor down, and the supervisor replaces it with an actor of the same size."""
from __future__ import annotations

import pytest
import ray

from mesh.api import Role, SamplingParams
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from mesh.faults import read_log
from mesh.hardware import Hardware
from tests.mesh.support import assert_no_blocks_held, replaced, supervised

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
    """A 1P:1D pool, each role at its tensor-parallel size, with the sizes. Its leases outlast a
    prefill slowed by a loaded host: one that expired was retried, and the transfer checked
    below was then another attempt's."""
    prefill_tp, decode_tp = request.param
    return make_pool(prefill=1, decode=1, lease_ttl_s=20.0, hardware={"prefill": Hardware(tensor_parallel_size=prefill_tp),
                                                    "decode": Hardware(tensor_parallel_size=decode_tp)}), request.param


async def test_a_mesh_across_tensor_parallel_degrees_gives_the_engine_alones_tokens(tp_pool, reference):
    pool, (prefill_tp, decode_tp) = tp_pool
    assert [m.info.tensor_parallel_size for m in (*pool.by_role(Role.PREFILL), *pool.by_role(Role.DECODE))] \
        == [prefill_tp, decode_tp]
    for n, prompt in enumerate([list(range(40, 77)), list(range(3, 12))]):
        tokens, transfer = await generate(pool, f"tp{n}", prompt, 16)
        assert tokens == reference(prompt, 16)
        # one part per KV head (each rank of the TP=2 side holds one), moved as that head only: strided
        # in the TP=1 pool, whose side copies it per run; together every byte of the prompt's KV, once
        assert transfer["strategy"] == "contiguous"
        assert transfer["bytes"] == LAYERS * 2 * len(prompt) * KV_HEADS * HEAD_DIM * 4
    await assert_no_blocks_held(pool)


async def test_a_tensor_parallel_actor_holds_its_ranks_bundles_until_it_is_removed(tp_pool):
    pool, sizes = tp_pool
    member = next(m for m in pool.members.values() if m.info.tensor_parallel_size == 2)
    other = next(m for m in pool.members.values() if m.info.tensor_parallel_size == 1)
    table = ray.util.placement_group_table(member.placement)
    # one bundle with both ranks' CPUs, the actor's (it sees the devices of its own bundle only)
    assert (table["state"], table["strategy"], table["bundles"]) == ("CREATED", "STRICT_PACK", {0: {"CPU": 2.0}})
    assert member.info.placement_group == member.placement.id.hex()
    assert other.placement is None and other.info.placement_group is None
    group = member.placement
    await pool.remove(member.actor_id, force=True)
    assert ray.util.placement_group_table(group)["state"] == "REMOVED"


@pytest.fixture(scope="module")
def fault_log(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rank-faults") / "fired.jsonl")


@pytest.fixture(scope="module")
def rank_fault_pool(make_pool, fault_log):
    """1P:1D, the decode actor at TP=2, with a fault point that kills its worker rank."""
    return make_pool(prefill=1, decode=1, faults="kill:rank_decode_step=3@request=rank-dies", fault_log=fault_log,
                     hardware={"prefill": Hardware(), "decode": Hardware(tensor_parallel_size=2)})


async def test_a_killed_rank_takes_its_actor_down_and_the_supervisor_replaces_it(rank_fault_pool, reference,
                                                                                  fault_log):
    pool = rank_fault_pool
    prompt = list(range(20, 60))
    async with supervised(pool):
        events, tokens = [], []
        async for chunk in Dispatcher(pool).generate(
                Request("rank-dies", prompt, SamplingParams(max_tokens=12, **GREEDY)), events):
            tokens += chunk.token_ids
        assert tokens == reference(prompt, 12)  # moved on from the tokens sent: none lost, none twice
        [hit] = [f for f in read_log(fault_log) if f.request == "rank-dies"]
        assert hit.point == "rank_decode_step" and hit.n >= 3
        [lost] = [e for e in events if e.name == "actor_lost"]
        assert lost.attributes["actor"] == hit.actor and lost.attributes["phase"] == "decode"
        new = await replaced(pool, hit.actor)
        assert new.info.tensor_parallel_size == 2 and new.placement is not None
    await assert_no_blocks_held(pool)
