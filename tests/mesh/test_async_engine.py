"""The engine on an event loop: a stream cancelled before its request reached the engine
thread leaves nothing running and no KV held (the `make_engine` fixture checks blocks at the end)."""
from __future__ import annotations

import asyncio
import time

from mesh.async_engine import AsyncEngine
from mesh.engine.sampling_params import SamplingParams


async def test_a_stream_cancelled_while_registering_aborts_its_request(checkpoint, make_engine):
    engine = make_engine(checkpoint())
    aengine = AsyncEngine(engine)
    aengine.start()
    try:
        busy = asyncio.ensure_future(aengine.call(time.sleep, 0.3))  # the engine thread is busy first
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

        async def consume():
            async for _ in aengine.stream(lambda: engine.add_request(list(range(100, 120)), params)):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)  # the stream's registration is queued behind the sleep
        task.cancel()
        await asyncio.gather(task, busy, return_exceptions=True)
        unfinished, free = await aengine.call(lambda: (engine.has_unfinished(), engine.blocks.num_free))
        assert not unfinished and free == engine.blocks.num_blocks
    finally:
        await aengine.close()


async def test_a_request_that_fails_in_a_step_ends_its_own_stream_only(checkpoint, make_engine):
    from mesh.errors import MeshError

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    clean = make_engine(checkpoint()).generate([list(range(30, 40))], params)[0].token_ids
    engine = make_engine(checkpoint(), fail_steps={"poison": 2})
    aengine = AsyncEngine(engine)
    aengine.start()

    async def tokens(rid: str) -> list[int]:
        out = []
        async for outs in aengine.stream(lambda: engine.add_request(list(range(30, 40)), params, rid)):
            out += [t for o in outs for t in o.token_ids]
        return out

    try:
        innocent, poison = await asyncio.gather(tokens("innocent"), tokens("poison"), return_exceptions=True)
        assert innocent == clean
        assert isinstance(poison, MeshError) and poison.code == "internal"
        assert "request poison failed in the engine" in poison.message and "fault injected" in poison.message
    finally:
        await aengine.close()


async def test_the_engine_steps_on_while_the_event_loop_is_busy(checkpoint, make_engine):
    """Steps run back to back on the engine thread: a request finishes while the loop is held
    (it would stall at its second token if each step waited for the loop), and what it made
    meanwhile reaches the stream as one burst, token for token what it makes alone."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompt = list(range(30, 40))
    clean = make_engine(checkpoint()).generate([prompt], params)[0].token_ids
    engine = make_engine(checkpoint())
    aengine = AsyncEngine(engine)
    aengine.start()
    try:
        bursts = []
        async for outs in aengine.stream(lambda: engine.add_request(prompt, params)):
            bursts.append([t for o in outs for t in o.token_ids])
            if len(bursts) == 1:
                assert not outs[-1].finished  # the loop took the first token as it came
                deadline = time.monotonic() + 30
                while engine.has_unfinished() and time.monotonic() < deadline:  # holds the loop
                    time.sleep(0.01)
                assert not engine.has_unfinished(), "the engine stopped stepping while the loop was busy"
        assert len(bursts) == 2 and sum(bursts, []) == clean
    finally:
        await aengine.close()


async def test_a_built_engine_steps_on_the_thread_that_built_it(checkpoint, make_engine):
    import threading

    built_on = []

    def make():
        built_on.append(threading.get_ident())
        return make_engine(checkpoint())

    aengine = await AsyncEngine.build(make)
    aengine.start()
    try:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        stepped_on = set()
        real_step = aengine.engine.step

        def step():
            stepped_on.add(threading.get_ident())
            return real_step()

        aengine.engine.step = step
        async for _ in aengine.stream(lambda: aengine.engine.add_request(list(range(40, 50)), params)):
            pass
        assert stepped_on == set(built_on) and built_on[0] != threading.get_ident()
    finally:
        await aengine.close()
