"""Prefix caching: hash chains, shared reference-counted blocks, LRU eviction, copy-on-write, and
outputs identical with the cache on and off on a real tiny model."""
from __future__ import annotations

import pytest

from mesh.engine.block_manager import BlockManager, OutOfBlocks
from mesh.engine.prefix_cache import PrefixCache, block_hashes
from mesh.engine.sampling_params import SamplingParams
from tests.engine.helpers import collect, prompt

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def test_hashes_chain_the_whole_context_and_are_stable_across_processes():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # the partial third block is not hashed
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == a
    assert block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)[1] != a[1]  # same block, other context
    assert block_hashes([5, 6, 7, 8], 4, parent=a[0]) == a[1:]
    # A fixed value: the gateway and other processes compute the same hashes from prompts.
    assert a[0] == 0x2728ab4454aaa05b


def cache_with(num_blocks: int = 8) -> PrefixCache:
    return PrefixCache(BlockManager(num_blocks, 4))


def test_shared_blocks_are_counted_and_idle_ones_stay_cached():
    cache = cache_with()
    hashes = block_hashes(list(range(8)), 4)
    owner = cache.allocate(2)
    for b, h in zip(owner, hashes):
        cache.register(b, h)
    assert cache.match(hashes + [123]) == owner
    cache.acquire(owner)  # a second request shares them
    cache.free(owner)
    assert cache.num_free == 6  # still held by the second request
    cache.free(owner)
    assert cache.num_free == 8 and cache.num_cached == 2  # idle, but still findable
    assert cache.match(hashes) == owner
    with pytest.raises(ValueError, match="not held"):
        cache.free(owner[:1])


def test_eviction_takes_idle_blocks_oldest_first_and_never_held_ones():
    cache = cache_with(6)
    held = cache.allocate(2)
    for i, b in enumerate(held):
        cache.register(b, 100 + i)
    idle = cache.allocate(3)
    for i, b in enumerate(idle):
        cache.register(b, 200 + i)
    cache.free(idle)  # idle, oldest first: 200, 201, 202
    assert cache.num_free == 4
    got = cache.allocate(2)  # 1 plain free block and the oldest idle one
    assert idle[0] in got and cache.match([200]) == [] and cache.match([201]) == [idle[1]]
    assert cache.match([100, 101]) == held
    with pytest.raises(OutOfBlocks):
        cache.allocate(3)  # 2 idle left: held blocks are never taken
    assert cache.match([100, 101]) == held and cache.num_free == 2
    cache.free(got + held)
    assert cache.clear() == 4 and cache.num_free == 6 and cache.runs() == [(0, 6)]


def run_all(engine, prompts, params=GREEDY) -> list[list[int]]:
    rids = [engine.add_request(p, params) for p in prompts]
    outputs: dict[str, list[int]] = {}
    collect(engine, outputs)
    return [outputs[r] for r in rids]


SHARED = prompt(10, 100)  # 2.5 blocks of 4
PROMPTS = [SHARED + prompt(5, 300), SHARED + prompt(3, 500), SHARED[:6] + prompt(7, 700), SHARED[:8]]


@pytest.mark.parametrize("together", [True, False], ids=["one-batch", "one-after-another"])
def test_outputs_match_with_the_cache_on_and_off(together, checkpoint, make_engine):
    folder = checkpoint()
    off = make_engine(folder, enable_prefix_caching=False)
    on = make_engine(folder)
    want = run_all(off, PROMPTS)
    if together:
        assert run_all(on, PROMPTS) == want
    else:
        assert [run_all(on, [p])[0] for p in PROMPTS] == want
        assert on.blocks.hits > 0


def test_prefill_computes_only_the_uncached_suffix_in_a_run_of_new_blocks(checkpoint, make_engine):
    engine = make_engine(checkpoint(), num_blocks=64)
    run_all(engine, [SHARED + prompt(30, 300)])
    second = SHARED + [300] + prompt(20, 900)  # shares 11 tokens: 2 full blocks of 4
    engine.add_request(second, GREEDY)
    engine.step()
    (seq, n), = engine.last_batch.prefills
    assert n == len(second) - 8
    new = seq.block_ids[2:]
    assert new == list(range(new[0], new[0] + len(new))), "new blocks should form one run"
    collect(engine, {})


def test_a_whole_prompt_hit_copies_its_last_block_before_writing(checkpoint, make_engine):
    engine = make_engine(checkpoint())
    whole = prompt(8, 100)  # exactly 2 blocks
    want = run_all(engine, [whole])
    src = engine.blocks.match(block_hashes(whole, 4))[-1]
    before = engine.kv.pool[:, :, src].clone()
    rid = engine.add_request(whole, GREEDY)
    outputs: dict[str, list[int]] = {}
    collect(engine, outputs, steps=1)
    assert engine.last_batch.copies and engine.last_batch.copies[0][0] == src
    assert engine.last_batch.decodes[0].block_ids[1] != src  # computes into its own copy
    collect(engine, outputs)
    assert outputs[rid] == want[0]
    assert engine.kv.pool[:, :, src].equal(before), "a shared block was written"


def test_eviction_under_memory_pressure_keeps_outputs_and_held_blocks(checkpoint, make_engine):
    folder = checkpoint()
    prompts = [prompt(9, 100 + 37 * i) for i in range(6)] + [prompt(9, 100)] * 2
    want = run_all(make_engine(folder, enable_prefix_caching=False), prompts)
    engine = make_engine(folder, num_blocks=12)  # room for about two requests at once
    rids = [engine.add_request(p, GREEDY) for p in prompts]
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        collect(engine, outputs, steps=1)
        idle = set(engine.blocks._idle)
        for seq in engine.scheduler.running:
            assert not idle & set(seq.block_ids), "a block in use is evictable"
    assert [outputs[r] for r in rids] == want
    assert engine.blocks.evictions > 0 and engine.blocks.hits > 0
