"""Role flips in place under load: drain, switch, serve again; no request lost, no weights reloaded.
Lends between pools keep both pools' role limits; a dead actor answers in one line."""
from __future__ import annotations

import asyncio

import pytest
import ray

from mesh.api import ActorState, Role, SamplingParams
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from mesh.errors import MeshError
from mesh.role_limits import Bounds, RoleLimitError
from tests.mesh.support import assert_no_blocks_held

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def pool(make_pool):
    return make_pool(prefill=1, decode=2)


async def test_flip_under_load_loses_no_request(pool):
    dispatcher = Dispatcher(pool)

    async def one(i):
        tokens = []
        request = Request(f"flip{i}", [5 + i] * (8 + i), SamplingParams(max_tokens=40, **GREEDY))
        async for chunk in dispatcher.generate(request):
            tokens += chunk.token_ids
        return tokens

    tasks = [asyncio.create_task(one(i)) for i in range(6)]
    await asyncio.sleep(0.3)
    decode = pool.by_role(Role.DECODE)[0]
    pid_before = decode.info.pid
    info = (await pool.flip(decode.actor_id, Role.PREFILL)).report
    results = await asyncio.gather(*tasks)
    assert all(len(r) == 40 for r in results)
    assert info.role is Role.PREFILL and info.state is ActorState.SERVING and info.pid == pid_before
    assert len(pool.by_role(Role.PREFILL)) == 2
    # the flipped actor now prefills
    events = []
    async for _ in dispatcher.generate(Request("after", [9] * 30, SamplingParams(max_tokens=4, **GREEDY)), events):
        pass
    assert (await pool.flip(decode.actor_id, Role.DECODE)).report.role is Role.DECODE
    await assert_no_blocks_held(pool)


@pytest.fixture(scope="module")
def two_pools(make_pool):
    return make_pool(prefill=1, decode=1), make_pool(prefill=0, decode=1)


async def test_idle_actor_moves_to_another_scenario_of_the_same_model_within_both_pools_limits(two_pools):
    lender, borrower = two_pools
    assert not borrower.by_role(Role.PREFILL)
    prefill = lender.by_role(Role.PREFILL)[0]
    with pytest.raises(RoleLimitError, match=f"cannot lend {prefill.actor_id} to {borrower.spec.scenario} as "
                                             f"prefill: scenario '{lender.spec.scenario}' would have 0 serving "
                                             "prefill actor"):
        await lender.lend(prefill.actor_id, borrower)
    lender.spec.limits = {"prefill": Bounds(0), "decode": Bounds(1)}  # the operator lowers the lender's minimum
    lent = await lender.lend(prefill.actor_id, borrower)
    assert lent.report.scenario == borrower.spec.scenario and lent.report.role is Role.PREFILL
    assert lent.warning is None
    tokens = []
    async for chunk in Dispatcher(borrower).generate(Request("lent", [4] * 12,
                                                             SamplingParams(max_tokens=8, **GREEDY))):
        tokens += chunk.token_ids
    assert len(tokens) == 8
    with pytest.raises(RoleLimitError, match="below its minimum of 1"):  # the borrower's own minimum now
        await borrower.lend(prefill.actor_id, lender)
    back = await borrower.lend(prefill.actor_id, lender, force=True)  # and back, forced
    assert back.warning.startswith(f"forced to lend {prefill.actor_id} to {lender.spec.scenario}")
    assert len(lender.by_role(Role.PREFILL)) == 1


async def test_operations_on_a_dead_actor_answer_in_one_line(pool):
    member = await pool.add(Role.DECODE)
    ray.kill(member.handle, no_restart=True)
    with pytest.raises(ray.exceptions.RayActorError):  # the kill has landed
        while True:
            await member.handle.ping.remote()
            await asyncio.sleep(0.1)
    for op in (lambda: pool.flip(member.actor_id, Role.PREFILL), lambda: pool.drain(member.actor_id)):
        with pytest.raises(MeshError) as info:
            await op()
        assert info.value.message == (f"actor {member.actor_id} is dead: nothing was changed "
                                      "(`pdmesh status` lists the pool's actors)")
    assert (await pool.remove(member.actor_id)).warning is None
    assert member.actor_id not in pool.members
