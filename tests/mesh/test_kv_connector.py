"""The KV connector (mesh.kv) on real tiny engines and real UCX on loopback, without Ray: a lease
skips the prefix the decode engine holds, releases and aborts give every block back, a
reservation cancelled while queued takes nothing, and only the engine's thread ever calls the
block manager (make_engine checks every block is free when a test ends). Layer-wise: a layer
lands on the decode side before the prefill step that computes the next one has finished."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import torch

from mesh.async_engine import AsyncEngine
from mesh.engine.sampling_params import SamplingParams
from mesh.errors import MeshError
from mesh.faults import FaultPoints
from mesh.kv import KVConnector, RankPool
from tests.support.ray_fixtures import SECRET
from transport import TransferError, TransportConfig, make_sender

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SHARED = list(range(400, 440))  # 10 blocks of 4
BLOCK_METHODS = ("allocate", "append", "free", "match", "acquire", "register", "clear")


def watch_block_manager(*engines) -> list[str]:
    """The names of the threads that call the engines' block managers (each prefix cache and the
    BlockManager under it), recorded by a wrapper on every method that reads or changes blocks."""
    threads: list[str] = []
    for target in [t for e in engines for t in (e.blocks, getattr(e.blocks, "blocks", None))]:
        for name in BLOCK_METHODS:
            method = getattr(target, name, None)
            if method is None:
                continue

            def checked(*args, _method=method, **kwargs):
                threads.append(threading.current_thread().name)
                return _method(*args, **kwargs)
            setattr(target, name, checked)
    return threads


@contextlib.asynccontextmanager
async def actor_side(engine, lease_ttl_s: float = 5.0, layerwise: bool = False):
    """An engine on its thread with its KV connector receiving over UCX, as in an actor."""
    aengine = AsyncEngine(engine)
    aengine.start()
    kv = KVConnector(aengine, TransportConfig(backend="ucx", secret=SECRET, lease_ttl_s=lease_ttl_s,
                                              timeout_s=5.0), RankPool.of_engine(engine), FaultPoints("", "test"),
                     layerwise)
    await kv.open_receiver()
    try:
        yield aengine, kv
    finally:
        await kv.close()
        await aengine.close()


async def run(aengine: AsyncEngine, add) -> list:
    outs = []
    async for batch in aengine.stream(add):
        outs += batch
    return outs


async def prefill(aengine: AsyncEngine, rid: str, prompt: list[int]) -> list[int]:
    """The first token of a prefill_only request, whose blocks the engine keeps for sending."""
    outs = await run(aengine, lambda: aengine.engine.add_request(prompt, GREEDY, rid, prefill_only=True))
    assert outs[-1].finish_reason == "prefilled"
    return outs[-1].token_ids


async def all_free(aengine: AsyncEngine, wait_s: float = 5.0) -> bool:
    """Whether every block is free within wait_s: frees of ended leases are queued to the engine's
    thread once their waiters learn of the end, and a transfer cut mid-way settles first."""
    blocks = aengine.engine.blocks
    deadline = time.monotonic() + wait_s
    while not await aengine.call(lambda: blocks.num_free == blocks.num_blocks):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.fixture(autouse=True)
def ucx_on_loopback(monkeypatch):
    """The receivers here, in this process, pin its UCX to loopback (transport.address.for_node);
    set here, the pin goes again after the test instead of reaching later tests' processes."""
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")


@pytest.fixture
def engines(checkpoint, make_engine):
    return lambda: (make_engine(checkpoint(), threads=1), make_engine(checkpoint(), threads=1))


async def test_a_lease_skips_the_prefix_held_here_and_the_request_decodes_on(engines, checkpoint, make_engine):
    prompt = SHARED + [9, 8, 7, 6, 5]
    expected = make_engine(checkpoint()).generate([prompt], GREEDY)[0].token_ids
    pengine, dengine = engines()
    threads = watch_block_manager(dengine, pengine)
    async with actor_side(pengine) as (paengine, pkv), actor_side(dengine) as (daengine, dkv):
        await run(daengine, lambda: dengine.add_request(SHARED + [1, 2, 3], GREEDY))  # the prefix, cached here
        reservation = await dkv.reserve(prompt, align_tokens=4)
        assert reservation.prefix_tokens == len(SHARED) and reservation.prefix_blocks == len(SHARED) // 4
        assert reservation.leases[0].num_tokens == len(prompt) - len(SHARED)

        first = await prefill(paengine, "r", prompt)
        sent = await pkv.send("r", reservation.leases, reservation.prefix_tokens)
        await pkv.request_finished("r")
        assert sent.skipped_tokens == len(SHARED) and sent.blocks == 2  # the 5 tokens after the prefix
        assert sent.stats.bytes == pengine.kv.shape.bytes_per_token * 5

        add = await dkv.take(reservation.lease_id, lambda blocks: dengine.add_prefilled(
            prompt, first, GREEDY, blocks, "r"))
        outs = await run(daengine, add)
        assert first + [t for o in outs for t in o.token_ids] == expected
        assert dkv.pending_leases == 0
        assert await all_free(daengine) and await all_free(paengine)
    assert threads and set(threads) == {t for t in threads if t.startswith("engine")}, set(threads)


async def test_a_lease_released_before_its_commit_gives_back_its_blocks_and_its_held_prefix(engines):
    pengine, dengine = engines()
    threads = watch_block_manager(dengine)
    async with actor_side(pengine) as (paengine, pkv), actor_side(dengine) as (daengine, dkv):
        await run(daengine, lambda: dengine.add_request(SHARED + [1], GREEDY))
        prompt = SHARED + [2, 3, 4, 5, 6]
        reservation = await dkv.reserve(prompt, align_tokens=4)
        assert reservation.prefix_blocks == 10
        assert await daengine.call(lambda: dengine.blocks.num_blocks - dengine.blocks.num_free) == 10 + 2
        assert dkv.release_lease(reservation.lease_id)
        assert not dkv.release_lease(reservation.lease_id)  # once only
        assert await all_free(daengine) and dkv.pending_leases == 0

        await prefill(paengine, "late", prompt)  # its sender comes after the release: refused
        with pytest.raises(TransferError, match="lease"):
            await pkv.send("late", reservation.leases, reservation.prefix_tokens)
        await pkv.request_finished("late")
        assert await all_free(paengine)
    assert threads and set(threads) == {t for t in threads if t.startswith("engine")}, set(threads)


async def test_an_aborted_transfer_frees_the_lease_and_the_decode_learns_it(engines):
    pengine, dengine = engines()
    threads = watch_block_manager(dengine)
    prompt = list(range(100, 160))
    async with actor_side(pengine) as (paengine, pkv), actor_side(dengine) as (daengine, dkv):
        reservation = await dkv.reserve(prompt)
        await prefill(paengine, "cut", prompt)
        blocks = await pkv.scheduler.outgoing_blocks("cut", 0)
        sender = make_sender(pkv.transport)
        rank0 = pkv.worker.pools[0]
        transfer = await sender.start(reservation.leases[0], rank0.pool, rank0.layout, blocks)
        transfer.layer_ready(0)  # one layer on the wire, then the sender gives up
        await transfer.abort()
        await sender.close()
        with pytest.raises(MeshError, match="KV never arrived") as e:
            await dkv.take(reservation.lease_id, lambda blocks: pytest.fail("no KV to add"))
        assert e.value.code == "unavailable"
        await pkv.request_finished("cut")
        assert dkv.pending_leases == 0 and not dkv.release_lease(reservation.lease_id)
        assert await all_free(daengine) and await all_free(paengine)
    assert threads and set(threads) == {t for t in threads if t.startswith("engine")}, set(threads)


async def test_a_reservation_cancelled_while_queued_for_the_engine_takes_nothing(checkpoint, make_engine):
    engine = make_engine(checkpoint(), threads=1)
    async with actor_side(engine) as (aengine, kv):
        busy = asyncio.ensure_future(aengine.call(time.sleep, 0.3))  # the engine thread is busy first
        reserving = asyncio.ensure_future(kv.reserve(list(range(10, 50))))
        await asyncio.sleep(0.05)  # queued behind the sleep
        reserving.cancel()
        await asyncio.gather(busy, reserving, return_exceptions=True)
        assert reserving.cancelled()
        assert await all_free(aengine)  # its blocks were taken on the engine thread, then given back
        assert len(kv.worker.receiver) == 0 and kv.pending_leases == 0


async def test_a_lease_of_no_tokens_and_one_past_the_free_blocks_are_refused_clearly(checkpoint, make_engine):
    engine = make_engine(checkpoint(), threads=1, num_blocks=16)
    async with actor_side(engine) as (aengine, kv):
        with pytest.raises(MeshError, match="the prompt is empty") as e:
            await kv.reserve([])
        assert e.value.code == "invalid_argument"
        with pytest.raises(MeshError, match="no room for 80 tokens") as e:
            await kv.reserve(list(range(80)))  # 20 blocks of 4
        assert e.value.code == "resource_exhausted" and e.value.retry_after_s
        assert await all_free(aengine)


async def test_layerwise_a_layer_lands_before_the_prefill_computed_the_last_one(engines, checkpoint, make_engine):
    prompt = list(range(100, 160))  # 15 blocks, one prefill step
    expected = make_engine(checkpoint()).generate([prompt], GREEDY)[0].token_ids
    pengine, dengine = engines()
    last = pengine.model_config.num_layers - 1
    landed_early = []
    async with actor_side(pengine, layerwise=True) as (paengine, pkv), actor_side(dengine) as (daengine, dkv):
        reservation = await dkv.reserve(prompt)
        lease_blocks = list(reservation.leases[0].block_ids)
        send_layer = pengine.layer_hook

        def hold_the_last_layer(layer, batch):
            """On the engine's thread, before the last layer goes out: wait (bounded) for layer 0's
            KV of this request to be in the decode pool."""
            if layer == last and batch.prefills:
                src = pengine.kv.pool[0][:, batch.prefills[0][0].block_ids]
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not torch.equal(dengine.kv.pool[0][:, lease_blocks], src):
                    time.sleep(0.01)
                landed_early.append(torch.equal(dengine.kv.pool[0][:, lease_blocks], src))
            send_layer(layer, batch)
        pengine.layer_hook = hold_the_last_layer

        pkv.stream("s", reservation.leases, reservation.prefix_tokens)
        first = await prefill(paengine, "s", prompt)
        assert landed_early == [True]  # layer 0 was on the wire while the prefill step still ran
        sent = await pkv.send("s", reservation.leases, reservation.prefix_tokens)
        await pkv.request_finished("s")
        assert sent.blocks == 15 and sent.stats.layers == last + 1
        add = await dkv.take(reservation.lease_id, lambda blocks: dengine.add_prefilled(
            prompt, first, GREEDY, blocks, "s"))
        outs = await run(daengine, add)
        assert first + [t for o in outs for t in o.token_ids] == expected
        assert await all_free(daengine) and await all_free(paengine)


async def test_layerwise_a_request_that_ends_at_its_first_token_leaves_no_block_held(engines):
    pengine, dengine = engines()
    async with actor_side(pengine, layerwise=True) as (paengine, pkv), actor_side(dengine) as (daengine, dkv):
        prompt = list(range(100, 160))
        reservation = await dkv.reserve(prompt)
        pkv.stream("one", reservation.leases, 0)
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        outs = await run(paengine, lambda: pengine.add_request(prompt, params, "one", prefill_only=True))
        assert outs[-1].finish_reason == "length"  # nothing left for a decode actor
        # The started stream stops, or (its layers all out already) has committed: either way the
        # dispatcher releases the lease, as for any request that ends at its first token.
        await pkv.request_finished("one")
        dkv.release_lease(reservation.lease_id)
        assert await all_free(daengine) and await all_free(paengine)
