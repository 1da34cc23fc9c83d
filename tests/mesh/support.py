"""What the mesh tests share besides fixtures: waits on a live pool (no KV block held, the
replacement of a dead actor) and the pool under a supervisor."""
from __future__ import annotations

import asyncio
import contextlib

import ray


async def assert_no_blocks_held(pool, wait_s: float = 5.0):
    """Every live actor has every KV block free (leases of dead senders expire in lease_ttl_s)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        infos = await pool.refresh()
        held = {i.actor_id: i.load.used_blocks for i in infos}
        if not any(held.values()):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"KV blocks still held: {held}")
        await asyncio.sleep(0.2)


async def killed(pool, role) -> list:
    """Kills every actor of the role (no restart by Ray); returns them once they have left
    routing (their open until_stopped calls fail at once, so each shows as dead)."""
    dead = pool.by_role(role)
    for member in dead:
        ray.kill(member.handle, no_restart=True)
    while any(m.actor_id in pool.members for m in dead):
        await pool.changed(30)
    return dead


@contextlib.asynccontextmanager
async def supervised(pool, policy=None):
    """The pool under a Supervisor (quick retries) for the block; closed after it."""
    from mesh.supervisor import RestartPolicy, Supervisor

    supervisor = Supervisor(pool, policy or RestartPolicy(backoff_s=0.01, max_backoff_s=0.05, start_timeout_s=60),
                            sync_s=0.2)
    supervisor.start()
    try:
        yield supervisor
    finally:
        await supervisor.close()


async def replaced(pool, dead_id: str, timeout_s: float = 120):
    """The member that replaced `dead_id`, once it serves."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        for m in pool.members.values():
            if m.life.replaces == dead_id:
                return m
        await pool.changed(deadline - loop.time())
    raise AssertionError(f"no replacement of {dead_id} within {timeout_s}s; offline: "
                         f"{[m.info for m in pool.offline.values()]}")
