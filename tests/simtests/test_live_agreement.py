"""The live mesh (a real local Ray, tiny-model actors) and the simulator, on the same small trace,
agree on which of two policies gives the lower TTFT.

The two policies are a pool with 2 prefill actors and one with 1, both under reject-when-busy
admission (a TTFT budget no queue can meet) and a 0.5 s pause after a pass of rejections. The
trace sends groups of three requests 15 ms apart: with 2 actors the first two are taken at once
and only the third waits out a pause, with 1 actor the second and third both do, so the median
TTFT is a prefill time (~0.1 s) against at least the pause (0.5 s). The gap comes from which
actor is busy when, not from how fast this machine computes, so it cannot flip with noise; the
test asserts only that ordering, never the times.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time

import numpy as np
import pytest

from mesh.api import Role, SamplingParams
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from mesh.routing import ForwardOnRejection
from simtests.cluster import Variant
from simtests.sim import Simulator
from simtests.traces import Trace, read_trace
from simtests.workload import from_trace
from tests.simtests.support import profile, scenario

PROMPT = 2048  # tokens: ~60 ms of tiny-model prefill on one core, long enough that "busy" outlasts the stagger
GROUPS, STAGGER_MS, GROUP_GAP_MS = 6, 15, 1500  # the 1-actor pool's last pause ends by ~1.1 s, before the next group
FORWARDING = ForwardOnRejection(min_retry_pause_s=0.5)
TTFT_BUDGET_S = 1e-3  # below any prefill: a busy actor always rejects, an idle one always accepts
DEADLINE_S = 10.0  # per request, live and simulated alike: no request runs out of offers or time
GREEDY = {"max_tokens": 1, "temperature": 0, "ignore_eos": True}  # TTFT only: no decode


@pytest.fixture
def trace_file(tmp_path):
    """A Mooncake JSONL trace: groups of three staggered requests, prefix ids all distinct."""
    rows = [{"timestamp": g * GROUP_GAP_MS + k * STAGGER_MS, "input_length": PROMPT, "output_length": 1,
             "hash_ids": [3 * g + k]} for g in range(GROUPS) for k in range(3)]
    path = tmp_path / "groups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompts(trace: Trace) -> list[list[int]]:
    # distinct random tokens: no request finds another's prefix in a prefix cache
    rng = np.random.default_rng(0)
    return [rng.integers(1, 1000, int(n)).tolist() for n in trace.prompt]


async def replay(pool, arrival_s: list[float], prompt_ids: list[list[int]], tag: str) -> list[float]:
    """Sends each request at its arrival time; returns the TTFTs, measured from the arrival."""
    dispatcher = Dispatcher(pool, router=FORWARDING)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(i: int) -> float:
        await asyncio.sleep(max(0.0, start + arrival_s[i] - loop.time()))
        req = Request(f"{tag}{i}", prompt_ids[i], SamplingParams(**GREEDY), deadline=time.monotonic() + DEADLINE_S,
                      ttft_budget_s=TTFT_BUDGET_S)
        async for _ in dispatcher.generate(req):
            return loop.time() - start - arrival_s[i]
        raise AssertionError(f"request {i} streamed nothing")

    return list(await asyncio.gather(*(one(i) for i in range(len(arrival_s)))))


def simulated_p50(make_cluster, trace: Trace, prefill_actors: int, prefill_s: float) -> float:
    model = profile(prefill=(0.0, prefill_s / PROMPT, 0.0), max_batch_tokens=PROMPT, block_tokens=16)
    cluster = make_cluster(scenario(p=prefill_actors, d=1, ttft=TTFT_BUDGET_S), model=model)
    sim = Simulator(cluster, Variant(controller=False, admission_timeout_s=DEADLINE_S), forwarding=FORWARDING)
    for a in sim.actors:  # the live actors were warmed up, so their prefill speed was measured: so is this
        a.rate = PROMPT / prefill_s
    run = sim.run(from_trace(trace, "groups"))
    assert np.isfinite(run.ttft).all(), "a simulated request was rejected"
    return float(np.median(run.ttft))


def test_live_and_simulated_agree_on_ttft_ordering(make_pool, make_cluster, trace_file):  # noqa: F811
    trace = read_trace(trace_file)
    trace.scenario = np.zeros(len(trace), dtype=np.int64)
    arrival, ids = trace.arrival_s.tolist(), prompts(trace)
    pool = make_pool(prefill=2, decode=1, block_size=16, num_blocks=1024, max_num_batched_tokens=PROMPT)

    async def live() -> tuple[float, float, float]:
        # warm-up: a staggered pair reaches both prefill actors (the second finds the first busy),
        # so each has measured its prefill speed; the admission's retry hints need it
        rng = np.random.default_rng(1)
        await replay(pool, [0.0, STAGGER_MS / 1e3], [rng.integers(1, 1000, PROMPT).tolist() for _ in range(2)], "w")
        # calibration for the simulated actors: one prefill on an idle pool, dispatch included
        prefill_s = (await replay(pool, [0.0], [rng.integers(1, 1000, PROMPT).tolist()], "c"))[0]
        two = await replay(pool, arrival, ids, "two")
        await pool.remove(pool.by_role(Role.PREFILL)[-1].actor_id)
        one = await replay(pool, arrival, ids, "one")
        return prefill_s, statistics.median(two), statistics.median(one)

    prefill_s, live_two, live_one = asyncio.run(live())
    sim_two, sim_one = (simulated_p50(make_cluster, trace, n, prefill_s) for n in (2, 1))
    figures = (f"TTFT p50 live: 2 prefill {live_two:.3f}s, 1 prefill {live_one:.3f}s; simulated: "
               f"{sim_two:.3f}s, {sim_one:.3f}s (prefill {prefill_s:.3f}s)")
    assert live_two < live_one, figures
    assert sim_two < sim_one, figures
