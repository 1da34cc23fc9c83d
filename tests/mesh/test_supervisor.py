"""The pool supervisor: a dead actor leaves routing at once and a replacement with the same
role and hardware takes its place; a replacement that cannot start is retried with backoff,
then given up; requests wait for a replacement on its way, and fail fast when none comes."""
from __future__ import annotations

import pytest
import ray

from mesh.api import ActorState, Role, SamplingParams
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from mesh.errors import MeshError
from mesh.supervisor import RestartPolicy
from tests.mesh.support import assert_no_blocks_held, killed, replaced, supervised

GREEDY = {"temperature": 0, "ignore_eos": True}


def test_policy_backs_off_then_gives_up():
    policy = RestartPolicy(max_starts=3, backoff_s=1.0, max_backoff_s=1.5)
    assert policy.next_start(0, 100.0) == 100.0  # the first start at once
    assert policy.next_start(1, 100.0) == 101.0
    assert policy.next_start(2, 100.0) == 101.5  # doubled, capped
    assert policy.next_start(3, 100.0) is None
    assert policy.dead(True, 0) and not policy.dead(False, 2) and policy.dead(False, 3)


@pytest.fixture(scope="module")
def pool(make_pool):
    return make_pool(prefill=1, decode=1)


async def run(pool, rid: str, prompt, max_tokens: int = 8, deadline: float = float("inf")) -> list[int]:
    tokens = []
    request = Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), deadline=deadline)
    async for chunk in Dispatcher(pool).generate(request):
        tokens += chunk.token_ids
    return tokens


async def test_a_killed_actor_is_replaced_with_the_same_role_and_hardware(pool, reference):
    async with supervised(pool):
        [dead] = await killed(pool, Role.DECODE)
        assert pool.offline[dead.actor_id].info.state is ActorState.DEAD
        assert pool.replacing(Role.DECODE)
        new = await replaced(pool, dead.actor_id)
        assert new.info.state is ActorState.SERVING and new.info.role is Role.DECODE
        assert new.life.dead_at <= new.life.starting_at <= new.life.serving_at
        assert dead.actor_id not in pool.offline  # the dead entry leaves once its replacement serves
        [new] = pool.by_role(Role.DECODE)
        assert new.hardware == dead.hardware
        assert await run(pool, "after-replace", [5] * 12) == reference([5] * 12, 8)
    await assert_no_blocks_held(pool)


async def test_a_request_waits_for_the_replacement(pool, reference):
    async with supervised(pool):
        [dead] = await killed(pool, Role.PREFILL)
        # no live prefill actor now, but one is starting: the request waits for it
        events = []
        tokens = []
        async for chunk in Dispatcher(pool).generate(Request("waits", [6] * 10, SamplingParams(max_tokens=6, **GREEDY)),
                                                     events):
            tokens += chunk.token_ids
        assert tokens == reference([6] * 10, 6)
        assert any(e.name == "waiting_for_actor" and e.attributes["role"] == "prefill" for e in events)
        await replaced(pool, dead.actor_id)
    await assert_no_blocks_held(pool)


async def test_missed_reports_make_an_actor_dead(pool):
    async with supervised(pool, RestartPolicy(max_missed_reports=2, backoff_s=0.01, start_timeout_s=60)) as supervisor:
        [member] = pool.by_role(Role.DECODE)
        supervisor.lost(member.actor_id, "its load report timed out", certain=False)
        assert member.actor_id in pool.members  # one miss is not a death
        supervisor.lost(member.actor_id, "its load report timed out", certain=False)
        assert pool.offline[member.actor_id].info.state is ActorState.DEAD
        assert "2 in a row" in pool.offline[member.actor_id].life.reason
        await replaced(pool, member.actor_id)


@pytest.fixture(scope="module")
def fragile(make_pool):
    """A pool of its own: its decode actor ends dead and unreplaced."""
    return make_pool(prefill=1, decode=1)


async def test_a_replacement_that_cannot_start_is_given_up(fragile):
    pool = fragile
    good = pool.spec.engine
    async with supervised(pool, RestartPolicy(max_starts=2, backoff_s=0.01)):
        pool.spec.engine = good.model_copy(update={"model": "/nonexistent/checkpoint"})  # every start fails
        [dead] = pool.by_role(Role.DECODE)
        ray.kill(dead.handle, no_restart=True)
        while not pool.offline.get(dead.actor_id, dead).life.given_up:
            await pool.changed(60)
        life = pool.offline[dead.actor_id].life
        assert life.starts == 2 and "checkpoint" in life.last_error
        assert not pool.replacing(Role.DECODE)
        # nothing is on its way: a request fails at once with UNAVAILABLE, it does not wait
        with pytest.raises(MeshError) as failed:
            await run(pool, "no-decode", [4] * 8)
        assert failed.value.code == "unavailable" and "no live decode actor" in failed.value.message
    pool.spec.engine = good
    await assert_no_blocks_held(pool)
