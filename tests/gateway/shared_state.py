"""What a test may change on the session's shared gateway (its actors and their roles, the
ratio controller's switches, pins and logs), taken before the test and put back after it, so
that the tests of the shared gateway pass in any order, each alone or all together.

An actor the test added is removed (after its replacement, if it died, has started), one it
flipped or drained is flipped back; an actor of the baseline that is gone cannot be put back,
and fails the test that lost it."""
from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

from mesh.api import ActorState, Role


@dataclass(frozen=True)
class Baseline:
    roles: dict[str, dict[str, Role]]  # scenario -> actor id -> role
    enabled: dict[str, bool]
    pins: dict[str, tuple[int, int]]
    records: int  # the decision log's length (ControlLoop.records)
    decisions: int  # the controller's own log (RatioController.log)


async def baseline(gw) -> Baseline:
    """The gateway's changeable state now (read on its loop)."""
    control = gw.control
    roles = {name: {m.actor_id: m.role for m in s.pool.members.values()} for name, s in gw.fleet.scenarios.items()}
    return Baseline(roles, dict(control.enabled), dict(control.controller.pins), len(control.records),
                    len(control.controller.log))


async def restore(gw, before: Baseline, timeout_s: float = 120) -> None:
    """Puts the gateway back to `before` (run on its loop); AssertionError if it cannot."""
    control = gw.control
    control.enabled.clear()
    control.enabled.update(before.enabled)
    control.controller.pins.clear()
    control.controller.pins.update(before.pins)
    for log, length in ((control.records, before.records), (control.controller.log, before.decisions)):
        while len(log) > length:
            log.pop()
    for name, roles in before.roles.items():
        await _restore_pool(gw.fleet.scenarios[name].pool, roles, timeout_s)


async def _restore_pool(pool, roles: dict[str, Role], timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while any(pool.replacing(role) for role in Role):  # a replacement on its way: let it serve, then remove it
        assert loop.time() < deadline, f"replacements still starting after {timeout_s}s: {list(pool.offline)}"
        await pool.changed(deadline - loop.time())
    lost = set(roles) - set(pool.members)
    assert not lost, f"the test lost actors of the shared gateway: {sorted(lost)}"
    for actor_id, role in roles.items():
        member = pool.members[actor_id]
        if member.role is not role or member.info.state is not ActorState.SERVING:
            await pool.flip(actor_id, role, force=True)
    for actor_id in set(pool.members) - set(roles):
        await pool.remove(actor_id, force=True)
    assert pool.roles().serving == Counter(role.value for role in roles.values()), pool.roles()
