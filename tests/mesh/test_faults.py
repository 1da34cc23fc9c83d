"""Actors killed at each phase of a request: the request completes (or fails cleanly), the pool
replaces the dead actor, and no KV block stays allocated anywhere."""
from __future__ import annotations

import asyncio

import pytest
import ray

from mesh.actor import Role
from mesh.dispatch import Dispatcher, Request
from mesh.engine.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.engine.sampling_params import SamplingParams
from tests.mesh.conftest import assert_no_blocks_held

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPT = list(range(3, 123))  # prefilled in 8 steps of 16 tokens: long enough to be killed mid-way
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def pool(make_pool):
    return make_pool(prefill=2, decode=2, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def expected(checkpoint):
    engine = Engine(EngineConfig(model=str(checkpoint("llama", "float32")), dtype="float32", num_blocks=128))
    return engine.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, **GREEDY))[0].token_ids


def kill(pool, actor_id):
    ray.kill(pool.members[actor_id].handle, no_restart=True)


async def run_killing(pool, when: str, victim: str, after_chunks: int = 1):
    """Runs one request and kills the `victim` ("prefill" or "decode") actor when the event
    `when` appears, or after `after_chunks` chunks when `when` is "chunks"."""
    events, tokens, chunks = [], [], 0
    dispatcher = Dispatcher(pool)
    killed = None

    async def watch():
        nonlocal killed
        while killed is None:
            for e in events:
                if e.name == when:
                    killed = e.attributes[victim]
                    kill(pool, killed)
                    return
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch()) if when != "chunks" else None
    async for chunk in dispatcher.generate(Request(f"kill-{when}-{victim}", PROMPT,
                                                   {"max_tokens": MAX_TOKENS, **GREEDY}), events):
        tokens += chunk["token_ids"]
        chunks += 1
        if when == "chunks" and chunks == after_chunks and killed is None:
            killed = next(e for e in events if e.name == "first_token").attributes[victim]
            kill(pool, killed)
    if watcher:
        watcher.cancel()
    return tokens, killed, events


async def finish_checks(pool, killed):
    assert killed is not None
    replaced = await pool.check()
    assert killed in replaced
    assert len(pool.by_role(Role.PREFILL)) == 2 and len(pool.by_role(Role.DECODE)) == 2
    await assert_no_blocks_held(pool)


async def test_prefill_killed_mid_prefill(pool, expected):
    # the offer's acceptance comes right before the 8-step prefill starts
    tokens, killed, events = await run_killing(pool, "prefill_accepted", "actor")
    assert tokens == expected
    assert any(e.name == "actor_lost" for e in events)
    await finish_checks(pool, killed)


async def test_prefill_killed_mid_transfer(pool, expected):
    tokens, killed, _ = await run_killing(pool, "first_token", "prefill")
    assert tokens == expected
    await finish_checks(pool, killed)


async def test_decode_killed_mid_transfer(pool, expected):
    tokens, killed, _ = await run_killing(pool, "first_token", "decode")
    assert tokens == expected
    await finish_checks(pool, killed)


async def test_decode_killed_mid_decode(pool, expected):
    tokens, killed, events = await run_killing(pool, "chunks", "decode", after_chunks=3)
    assert tokens == expected  # re-prefilled elsewhere from prompt + tokens sent: no gap, no repeat
    assert any(e.name == "actor_lost" and e.attributes["phase"] == "decode" for e in events)
    await finish_checks(pool, killed)
