"""A real local Ray cluster and pools of tiny-model actors for the mesh tests."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

SECRET = "mesh-test-secret-0123456789"


@pytest.fixture(scope="session")
def ray_cluster():
    from mesh.cluster import connect, disconnect

    connect(num_cpus=16)  # logical CPUs: tiny actors ask for one each and mostly wait
    yield
    disconnect()


@pytest.fixture(scope="module")
def make_pool(ray_cluster, checkpoint):
    """make_pool(prefill=1, decode=1, both=0, **engine_changes) -> a started Pool; closed after the module."""
    from mesh.api import EngineConfig
    from mesh.pool import Pool, PoolSpec
    from transport import TransportConfig

    pools = []

    def make(prefill=1, decode=1, both=0, backend="ucx", lease_ttl_s=3.0, faults="", fault_log="", **engine):
        """faults, fault_log: armed fault-injection points (mesh.faults) of every actor, replacements too."""
        engine = {"model": str(checkpoint("llama", "float32")), "dtype": "float32", "num_blocks": 128,
                  "block_size": 4, "threads": 1, **engine}
        transport = {"backend": backend, "secret": SECRET, "lease_ttl_s": lease_ttl_s, "timeout_s": 5.0}
        pool = Pool(PoolSpec(f"t{len(pools)}", EngineConfig(**engine), TransportConfig(**transport),
                             ttft_budget_s=5.0, faults=faults, fault_log=fault_log or None))
        asyncio.run(pool.scale(prefill=prefill, decode=decode, both=both))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        asyncio.run(pool.close())


@pytest.fixture(scope="module")
def reference(checkpoint):
    """reference(prompt, max_tokens) -> the greedy tokens of the engine alone, for comparison."""
    from mesh.engine.config import EngineConfig
    from mesh.engine.engine import Engine
    from mesh.engine.sampling_params import SamplingParams

    engine = Engine(EngineConfig(model=str(checkpoint("llama", "float32")), dtype="float32", num_blocks=256))

    def run(prompt, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return engine.generate([prompt], params)[0].token_ids

    return run


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
