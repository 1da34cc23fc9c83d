"""The role rule alone (mesh.role_limits) and the pool's guard around flip, drain and remove,
without Ray: limits per role, hardware per role, moves toward the limits, --force."""
from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest

from mesh.api import ActorReport, ActorState, DrainResult, EngineConfig, Role
from mesh.pool import Hardware, Member, Pool, PoolSpec
from mesh.role_limits import Bounds, Change, PoolRoles, RoleLimitError
from transport import TransportConfig

LIMITS = {"prefill": Bounds(1, 3), "decode": Bounds(1, 2)}
DEVICES = {"prefill": "npu", "decode": "cuda"}


def roles(prefill: int, decode: int) -> PoolRoles:
    return PoolRoles("chat", {"prefill": prefill, "decode": decode}, LIMITS, DEVICES)


@pytest.mark.parametrize("state, change, reason", [
    ((1, 1), Change("d0", "decode", None), "scenario 'chat' would have 0 serving decode actor(s), below its "
                                           "minimum of 1 (limits.decode.min in its scenario file): start another "
                                           "decode actor first (`pdmesh add chat decode`), or lower limits.decode.min"),
    ((2, 2), Change("p0", "prefill", "decode", "cuda"), "scenario 'chat' would have 3 serving decode actors, above "
                                                        "its maximum of 2 (limits.decode.max in its scenario file)"),
    ((1, 1), Change("new", None, "decode", ""), None),
    ((2, 1), Change("p0", "prefill", "decode", "npu"), "actor p0 runs on npu, but scenario 'chat' runs decode on "
                                                       "cuda (hardware.decode in its scenario file)"),
    ((2, 1), Change("p0", "prefill", "decode", "cuda"), None),
    ((2, 1), Change("p0", "prefill", "decode", ""), None),  # device not known: limits only
    ((1, 1), Change("d0", "decode", "decode", "npu"), None),  # same role: nothing moves
    ((0, 1), Change("new", None, "prefill", "npu"), None),  # below a minimum, growing toward it
    ((0, 1), Change("d0", "decode", "prefill", "npu"), "below its minimum of 1"),  # hardware aside, decode -> 0
    ((4, 1), Change("p0", "prefill", None), None),  # above a maximum, shrinking toward it
])
def test_the_rule(state, change, reason):
    verdict = roles(*state).judge(change)
    assert verdict.allowed == (reason is None)
    assert reason is None or reason in verdict.reason, verdict.reason


def _remote(result):
    """A fake Ray actor method: .remote(...) is awaitable."""
    async def call(*args):
        return result
    return SimpleNamespace(remote=call)


def fake_pool(prefill: int, decode: int, split_hardware: bool = False) -> Pool:
    """Actors on CPUs, or prefill on NPUs and decode on GPUs."""
    hardware = {"prefill": Hardware(npus=1), "decode": Hardware(num_gpus=1)} if split_hardware else {}
    pool = Pool(PoolSpec("chat", EngineConfig(model="m"), TransportConfig(backend="local"), limits=LIMITS,
                         hardware=hardware))
    for i, role in enumerate([Role.PREFILL] * prefill + [Role.DECODE] * decode):
        device = ("npu:0" if role is Role.PREFILL else "cuda:0") if split_hardware else "cpu"
        info = ActorReport(f"a{i}", "chat", role, ActorState.SERVING, device=device)
        handle = SimpleNamespace(set_role=_remote(DrainResult((), info)),
                                 drain=_remote(DrainResult((), dataclasses.replace(info, state=ActorState.DRAINING))))
        pool.members[f"a{i}"] = Member(f"a{i}", role, handle, info)
    return pool


async def test_the_pool_refuses_to_stop_its_only_decode_actor_unless_forced():
    pool = fake_pool(2, 1)
    for op, what in [(lambda **kw: pool.flip("a2", Role.PREFILL, **kw), "flip a2 to prefill"),
                     (lambda **kw: pool.drain("a2", **kw), "drain a2"),
                     (lambda **kw: pool.remove("a2", **kw), "remove a2")]:
        with pytest.raises(RoleLimitError, match=f"cannot {what}: scenario 'chat' would have 0 serving decode"):
            await op()
    assert pool.members["a2"].info.state is ActorState.SERVING  # refused: nothing changed
    result = await pool.drain("a2", force=True)
    assert result.warning.startswith("forced to drain a2: scenario 'chat' would have 0 serving decode")


async def test_the_pool_keeps_actors_on_their_roles_hardware():
    pool = fake_pool(2, 1, split_hardware=True)
    with pytest.raises(RoleLimitError, match="actor a0 runs on npu, but scenario 'chat' runs decode on cuda"):
        await pool.flip("a0", Role.DECODE)


async def test_a_draining_actor_no_longer_counts_so_two_drains_at_once_keep_the_minimum():
    pool = fake_pool(1, 2)
    release = asyncio.Event()

    async def slow_drain(*args):
        await release.wait()
        return DrainResult((), dataclasses.replace(pool.members["a1"].info, state=ActorState.DRAINING))
    pool.members["a1"].handle.drain = SimpleNamespace(remote=slow_drain)
    first = asyncio.create_task(pool.drain("a1"))
    await asyncio.sleep(0)  # a1's drain is under way
    with pytest.raises(RoleLimitError, match="cannot drain a2: scenario 'chat' would have 0 serving decode"):
        await pool.drain("a2")
    release.set()
    assert (await first).warning is None
