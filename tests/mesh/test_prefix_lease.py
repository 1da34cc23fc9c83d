"""The decode side of prefix reuse without Ray: how much of a prompt a lease may skip, and the
held prefix blocks released exactly once on every way a lease can end."""
from __future__ import annotations

import asyncio

import pytest

from mesh.engine.block_manager import BlockManager
from mesh.engine.prefix_cache import PrefixCache, block_hashes
from mesh.prefix_lease import PrefixHolds, acquire_prefix, skippable_tokens
from transport import ReceivedKV, TransferError, TransferStats

STATS = TransferStats("local", "contiguous", 0, 0, 0, 0, 0.0)


@pytest.mark.parametrize("num_tokens, block_size, align, expected", [
    (40, 4, 1, 36),   # never the whole prompt: the last block is sent
    (41, 4, 1, 40),
    (41, 4, 16, 32),  # whole blocks of the prefill side's 16 too
    (41, 4, 6, 36),   # lcm(4, 6) = 12
    (3, 4, 1, 0),
])
def test_a_lease_skips_whole_blocks_on_both_sides_and_never_the_whole_prompt(num_tokens, block_size, align,
                                                                              expected):
    assert skippable_tokens(num_tokens, block_size, align) == expected


def cache_holding(tokens: list[int], block_size: int = 4) -> PrefixCache:
    """A cache whose idle LRU holds the full blocks of `tokens`, as after a finished request."""
    cache = PrefixCache(BlockManager(32, block_size))
    hashes = block_hashes(tokens, block_size)
    blocks = cache.allocate(len(hashes))
    for b, h in zip(blocks, hashes):
        cache.register(b, h)
    cache.free(blocks)
    return cache


def test_the_matched_prefix_is_held_until_freed():
    cache = cache_holding(list(range(32)))  # 8 blocks
    held = acquire_prefix(cache, list(range(24)) + [99] * 10, align_tokens=8)
    assert len(held) == 6  # the 6 shared blocks: 24 tokens, whole blocks of 8
    assert cache.num_free == 32 - 6
    cache.allocate(26)  # a full cache evicts every idle block but the held ones
    assert set(held) <= set(range(32)) and cache.match(block_hashes(list(range(24)), 4)) == held
    cache.free(held)


def test_an_unaligned_hit_is_cut_to_whole_blocks_of_the_sender():
    cache = cache_holding(list(range(20)))  # 5 blocks
    held = acquire_prefix(cache, list(range(40)), align_tokens=8)
    assert len(held) == 4  # 20 tokens cached, 16 in blocks of 8
    cache.free(held)
    assert cache.num_free == 32


class Lease:
    """A lease's commit as the receiver's wait shows it."""

    def __init__(self, block_ids: list[int]):
        self.block_ids = block_ids
        self.commit: asyncio.Future = asyncio.get_running_loop().create_future()

    def land(self) -> None:
        self.commit.set_result(ReceivedKV("l", self.block_ids, len(self.block_ids), STATS))

    def end(self) -> None:
        self.commit.set_exception(TransferError("lease", "lease ended without a commit", "l"))


async def settle():
    for _ in range(3):
        await asyncio.sleep(0)


async def waiting_taker() -> tuple[list, PrefixHolds, Lease, asyncio.Future]:
    """Prefix block 1 held until lease "l" (block 7) commits, and a taker already waiting for
    them: (the freed blocks, the holds, the lease, the taker)."""
    freed = []
    holds = PrefixHolds(freed.extend)
    lease = Lease([7])
    holds.hold("l", [1], lease.commit)
    taker = asyncio.ensure_future(holds.take("l", None))
    await settle()
    return freed, holds, lease, taker


async def test_a_commit_hands_the_held_prefix_and_the_received_blocks_to_the_taker():
    freed = []
    holds = PrefixHolds(freed.extend)
    lease = Lease([7, 8])
    holds.hold("l", [1, 2], lease.commit)
    lease.land()
    assert await holds.take("l", None) == [1, 2, 7, 8]
    await settle()
    assert freed == [] and len(holds) == 0


async def test_a_lease_ending_without_a_commit_frees_the_held_prefix_once():
    freed = []
    holds = PrefixHolds(freed.extend)
    lease = Lease([7, 8])
    holds.hold("l", [1, 2], lease.commit)
    lease.end()  # released, expired or aborted
    await settle()
    assert freed == [1, 2] and len(holds) == 0
    with pytest.raises(TransferError, match="unknown lease"):
        await holds.take("l", None)
    assert freed == [1, 2]


async def test_a_taker_waiting_when_the_lease_ends_frees_nothing_twice():
    freed, holds, lease, taker = await waiting_taker()
    lease.end()
    with pytest.raises(TransferError):
        await taker
    await settle()
    assert freed == [1] and len(holds) == 0


@pytest.mark.parametrize("how", ["timeout", "cancelled"])
async def test_a_commit_landing_after_the_taker_gave_up_is_dropped(how):
    freed = []
    holds = PrefixHolds(freed.extend)
    lease = Lease([7, 8])
    holds.hold("l", [1, 2], lease.commit)
    if how == "timeout":
        with pytest.raises(TransferError, match="did not arrive"):
            await holds.take("l", 0)
    else:
        taker = asyncio.ensure_future(holds.take("l", None))
        await settle()
        taker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taker
    assert len(holds) == 0 and freed == []
    lease.land()
    await settle()
    assert freed == [1, 2, 7, 8]


@pytest.mark.parametrize("landed_first", [True, False])
async def test_a_lease_released_before_any_decode_took_it_drops_its_blocks_once(landed_first):
    # A request cancelled between its commit and its decode call: the gateway releases the lease.
    freed = []
    holds = PrefixHolds(freed.extend)
    lease = Lease([7, 8])
    holds.hold("l", [1, 2], lease.commit)
    if landed_first:
        lease.land()
        await settle()
    holds.release("l")
    if not landed_first:
        lease.land()
    await settle()
    assert freed == [1, 2, 7, 8] and len(holds) == 0
    with pytest.raises(TransferError, match="unknown lease"):
        await holds.take("l", None)
    holds.release("l")  # a second release is a no-op
    await settle()
    assert freed == [1, 2, 7, 8]


async def test_a_release_racing_a_waiting_taker_frees_once_and_the_taker_fails():
    freed, holds, lease, taker = await waiting_taker()
    holds.release("l")
    lease.land()
    with pytest.raises(TransferError, match="released"):
        await taker
    await settle()
    assert freed == [1, 7]
