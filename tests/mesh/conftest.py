"""A real local Ray cluster and pools of tiny-model actors for the mesh tests."""
from __future__ import annotations

import asyncio

import pytest

SECRET = "mesh-test-secret-0123456789"


@pytest.fixture(scope="session")
def ray_cluster():
    from mesh.cluster import connect, disconnect

    connect(num_cpus=8)  # logical CPUs: tiny actors ask for one each and mostly wait
    yield
    disconnect()


@pytest.fixture(scope="module")
def make_pool(ray_cluster, checkpoint):
    """make_pool(prefill=1, decode=1, both=0, **engine_changes) -> a started Pool; closed after the module."""
    from mesh.pool import Pool, PoolSpec

    pools = []

    def make(prefill=1, decode=1, both=0, backend="ucx", lease_ttl_s=3.0, **engine):
        engine = {"model": str(checkpoint("llama", "float32")), "dtype": "float32", "num_blocks": 128,
                  "block_size": 4, "threads": 1, **engine}
        transport = {"backend": backend, "secret": SECRET, "lease_ttl_s": lease_ttl_s, "timeout_s": 5.0}
        pool = Pool(PoolSpec(f"t{len(pools)}", engine, transport, ttft_budget_s=5.0))
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
        held = {i["actor_id"]: i["load"]["num_blocks"] - i["load"]["free_blocks"] for i in infos}
        if not any(held.values()):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"KV blocks still held: {held}")
        await asyncio.sleep(0.2)
