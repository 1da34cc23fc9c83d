"""Role flips in place under load: drain, switch, serve again; no request lost, no weights reloaded."""
from __future__ import annotations

import asyncio

import pytest

from mesh.actor import Role
from mesh.dispatch import Dispatcher, Request
from tests.mesh.conftest import assert_no_blocks_held

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def pool(make_pool):
    return make_pool(prefill=1, decode=2)


async def test_flip_under_load_loses_no_request(pool):
    dispatcher = Dispatcher(pool)

    async def one(i):
        tokens = []
        async for chunk in dispatcher.generate(Request(f"flip{i}", [5 + i] * (8 + i), {"max_tokens": 40, **GREEDY})):
            tokens += chunk["token_ids"]
        return tokens

    tasks = [asyncio.create_task(one(i)) for i in range(6)]
    await asyncio.sleep(0.3)
    decode = pool.by_role(Role.DECODE)[0]
    pid_before = decode.info["pid"]
    info = await pool.flip(decode.actor_id, Role.PREFILL)
    results = await asyncio.gather(*tasks)
    assert all(len(r) == 40 for r in results)
    assert info["role"] == "prefill" and info["state"] == "serving" and info["pid"] == pid_before
    assert len(pool.by_role(Role.PREFILL)) == 2
    # the flipped actor now prefills
    events = []
    async for _ in dispatcher.generate(Request("after", [9] * 30, {"max_tokens": 4, **GREEDY}), events):
        pass
    info = await pool.flip(decode.actor_id, Role.DECODE)
    assert info["role"] == "decode"
    await assert_no_blocks_held(pool)


@pytest.fixture(scope="module")
def two_pools(make_pool):
    return make_pool(prefill=1, decode=1), make_pool(prefill=0, decode=1)


async def test_idle_actor_moves_to_another_scenario_of_the_same_model(two_pools):
    lender, borrower = two_pools
    assert not borrower.by_role(Role.PREFILL)
    prefill = lender.by_role(Role.PREFILL)[0]
    info = await lender.lend(prefill.actor_id, borrower)
    assert info["scenario"] == borrower.spec.scenario and info["role"] == "prefill"
    tokens = []
    async for chunk in Dispatcher(borrower).generate(Request("lent", [4] * 12, {"max_tokens": 8, **GREEDY})):
        tokens += chunk["token_ids"]
    assert len(tokens) == 8
    await borrower.lend(prefill.actor_id, lender)  # and back
    assert len(lender.by_role(Role.PREFILL)) == 1
