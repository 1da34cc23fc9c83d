"""Token feeds (mesh/token_feed.py): the requests an actor serves for one caller share one
Ray stream, one message per engine step, and each request still gets exactly its tokens, in
order, with its own end."""
from __future__ import annotations

import asyncio

import pytest

from mesh.api import ActorRequest, FeedItem, Role, StreamChunk
from mesh.engine.sampling_params import SamplingParams
from mesh.errors import MeshError
from mesh.token_feed import Feeds, Outbox

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPTS = [[7 + i] * (6 + 3 * i) for i in range(4)]
MAX_TOKENS = 24


def chunk(tokens: list[int], finished: bool = False) -> StreamChunk:
    return StreamChunk(tokens, "", None, finished, "length" if finished else None, 3, len(tokens))


async def test_an_outbox_carries_what_was_queued_between_reads_as_one_message():
    outbox = Outbox()
    feed = outbox.serve("f")
    first = asyncio.ensure_future(feed.__anext__())
    await outbox.opened("f")  # the feed is open once its reader started
    outbox.put("f", FeedItem("a", chunk([1])))
    outbox.put("f", FeedItem("b", chunk([2])))
    outbox.put("f", FeedItem("a", error=MeshError("internal", "boom")))
    assert [(i.request_id, i.chunk and i.chunk.token_ids) for i in await first] == [("a", [1]), ("b", [2]), ("a", None)]
    await feed.aclose()
    with pytest.raises(MeshError, match="token feed f closed: nobody reads request a"):
        outbox.put("f", FeedItem("a", chunk([3])))


async def test_a_request_waits_for_its_feed_to_open_and_gives_up_with_a_message():
    outbox = Outbox()
    waiting = asyncio.ensure_future(outbox.opened("late", timeout_s=5))
    await asyncio.sleep(0)
    assert not waiting.done()
    feed = outbox.serve("late")
    reading = asyncio.ensure_future(feed.__anext__())
    await asyncio.wait_for(waiting, 5)
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    with pytest.raises(MeshError, match="token feed never was not opened within 0 s: a caller opens its feed"):
        await outbox.opened("never", timeout_s=0.01)


async def test_an_outbox_refuses_a_second_reader_of_one_feed():
    outbox = Outbox()
    first = outbox.serve("f")
    reading = asyncio.ensure_future(first.__anext__())
    await outbox.opened("f")
    with pytest.raises(MeshError, match="token feed f is open already"):
        await outbox.serve("f").__anext__()
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)


@pytest.fixture(scope="module")
def pool(make_pool):
    return make_pool(prefill=0, decode=0, both=1)


async def test_concurrent_requests_share_one_feed_message_per_step_and_each_gets_its_tokens(pool, reference):
    actor = pool.by_role(Role.BOTH)[0]
    # read the raw feed as a caller does, counting its messages
    feed_id = "raw-feed"
    raw = actor.handle.feed.options(num_returns="streaming").remote(feed_id)
    requests = [ActorRequest(f"feed-{i}", p, SamplingParams(max_tokens=MAX_TOKENS, **GREEDY))
                for i, p in enumerate(PROMPTS)]
    calls = [actor.handle.generate.remote(r, feed_id) for r in requests]
    tokens = {r.request_id: [] for r in requests}
    finished, messages, chunks = set(), 0, 0
    async for ref in raw:
        items = await ref
        messages += 1
        for item in items:
            assert item.error is None
            chunks += 1
            tokens[item.request_id] += item.chunk.token_ids
            if item.chunk.finished:
                finished.add(item.request_id)
        if len(finished) == len(requests):
            break
    ray_cancel(raw)
    await asyncio.gather(*calls)
    assert [tokens[r.request_id] for r in requests] == [reference(p, MAX_TOKENS) for p in PROMPTS]
    # all four decode in one batch: while they do, one message carries a chunk of each
    assert messages < chunks - MAX_TOKENS, (messages, chunks)


async def test_a_request_refused_by_its_actor_ends_its_stream_with_that_error(pool):
    actor = pool.by_role(Role.BOTH)[0]
    feeds = Feeds()
    feed = feeds.of(actor.actor_id, actor.handle)
    bad = ActorRequest("too-long", [3] * 100_000, SamplingParams(max_tokens=4, **GREEDY))
    stream = feed.follow(bad.request_id, actor.handle.generate.remote(bad, feed.feed_id))
    with pytest.raises(MeshError, match="invalid_argument"):
        await stream.__anext__()
    # the feed serves on: a good request after it gets its tokens
    good = ActorRequest("after-bad", PROMPTS[0], SamplingParams(max_tokens=3, **GREEDY))
    got = [c async for c in feed.follow(good.request_id, actor.handle.generate.remote(good, feed.feed_id))]
    assert sum(len(c.token_ids) for c in got) == 3 and got[-1].finished
    twice = ActorRequest("twice", PROMPTS[1], SamplingParams(max_tokens=2, **GREEDY))
    first = feed.follow(twice.request_id, actor.handle.generate.remote(twice, feed.feed_id))
    with pytest.raises(MeshError, match="request id twice is in flight already: give each request its own id"):
        feed.follow(twice.request_id, actor.handle.ping.remote())
    assert sum([len(c.token_ids) async for c in first]) == 2  # the first one is served as ever
    await feeds.close()


def ray_cancel(ref) -> None:
    import ray
    ray.cancel(ref)
