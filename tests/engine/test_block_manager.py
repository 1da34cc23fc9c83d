"""The KV block allocator alone: pure bookkeeping, no model."""
from __future__ import annotations

import random

import pytest

from mesh.engine.block_manager import BlockManager, OutOfBlocks
from tests.engine.helpers import count_runs


def check_invariants(bm: BlockManager, owned: dict[int, list[int]]) -> None:
    """Every block is either owned by exactly one request or in exactly one free run,
    free runs are maximal (neighbours merged), and the free count agrees."""
    held = [b for ids in owned.values() for b in ids]
    assert len(held) == len(set(held)), "a block was handed out twice"
    free = [b for start, length in bm.runs() for b in range(start, start + length)]
    assert len(free) == len(set(free)), "a block is in two free runs"
    assert set(held).isdisjoint(free), "a block is both held and free"
    assert sorted(held + free) == list(range(bm.num_blocks)), "a block is neither held nor free"
    assert bm.num_free == len(free)
    runs = bm.runs()
    assert all(s1 + n1 < s2 for (s1, n1), (s2, _) in zip(runs, runs[1:])), "adjacent free runs not merged"


@pytest.mark.parametrize("seed", range(6))
def test_random_allocate_append_free_never_hands_out_a_block_twice(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=rng.choice([16, 64, 200]), block_size=4)
    owned: dict[int, list[int]] = {}
    for op in range(600):
        action = rng.random()
        if action < 0.4 and bm.num_free:
            n = rng.randint(0, min(bm.num_free, 12))
            owned[op] = bm.allocate(n, expected_total=n + rng.randint(0, 8))
            assert len(owned[op]) == n
        elif action < 0.75 and owned and bm.num_free:
            bm.append(rng.choice(list(owned.values())))
        elif owned:
            bm.free(owned.pop(rng.choice(list(owned))))
        check_invariants(bm, owned)
    for ids in owned.values():
        bm.free(ids)
    assert bm.runs() == [(0, bm.num_blocks)] and bm.num_free == bm.num_blocks


def test_fresh_pool_gives_one_run():
    bm = BlockManager(32, 16)
    assert bm.allocate(5) == [0, 1, 2, 3, 4]
    assert bm.allocate(3) == [5, 6, 7]


def test_allocation_takes_one_run_when_any_run_is_big_enough():
    bm = BlockManager(40, 4)
    a, b, c, d = bm.allocate(5), bm.allocate(4), bm.allocate(8), bm.allocate(6)  # 0-4, 5-8, 9-16, 17-22
    bm.free(a)
    bm.free(c)  # free: 0-4 (5 blocks), 9-16 (8), 23-39 (17)
    # Best fit: the smallest hole that holds the whole request, as one run.
    assert bm.allocate(7) == list(range(9, 16))
    assert bm.allocate(4) == list(range(0, 4))
    bm.free(b)
    bm.free(d)


def test_allocation_spans_runs_only_when_no_run_is_big_enough():
    bm = BlockManager(12, 4)
    blocks = [bm.allocate(1) for _ in range(12)]
    bm.free([b for i, (b,) in enumerate(blocks) if i % 3 != 2])  # free runs of 2: 0-1, 3-4, 6-7, 9-10
    ids = bm.allocate(5)
    assert len(set(ids)) == 5 and count_runs(ids) == 3  # as few runs as the holes allow


def test_expected_growth_picks_a_run_with_room_to_grow():
    bm = BlockManager(30, 4)
    first, gap, rest = bm.allocate(3), bm.allocate(1), bm.allocate(10)
    bm.free(first)  # holes: 0..2 (3 blocks) and 14..29 (16 blocks)
    ids = bm.allocate(2, expected_total=6)  # fits the small hole now, but not its growth
    for _ in range(4):
        bm.append(ids)
    assert ids == list(range(14, 20))
    bm.free(ids + gap + rest)


def test_two_growing_requests_each_stay_one_run():
    bm = BlockManager(64, 4)
    a = bm.allocate(2, expected_total=8)
    b = bm.allocate(2, expected_total=8)
    for _ in range(6):
        bm.append(a)
        bm.append(b)
    assert count_runs(a) == 1 and count_runs(b) == 1


def test_append_extends_the_run_when_the_next_block_is_free():
    bm = BlockManager(16, 4)
    ids = bm.allocate(2)
    assert bm.append(ids) == 2 and ids == [0, 1, 2]


def test_append_falls_back_to_another_block_when_the_next_is_taken():
    bm = BlockManager(16, 4)
    ids, neighbour = bm.allocate(2), bm.allocate(1)
    new = bm.append(ids)
    assert new not in (0, 1, 2) and ids == [0, 1, new]
    bm.free(ids + neighbour)


def test_freed_neighbours_coalesce_into_one_run():
    bm = BlockManager(10, 4)
    a, b, c = bm.allocate(3), bm.allocate(3), bm.allocate(4)
    bm.free(a)
    bm.free(c)
    assert bm.runs() == [(0, 3), (6, 4)]
    bm.free(b)  # merges with the run before and the run after
    assert bm.runs() == [(0, 10)]
    assert bm.allocate(10) == list(range(10))


def test_double_free_is_an_error_and_changes_nothing():
    bm = BlockManager(8, 4)
    ids = bm.allocate(3)
    bm.free(ids)
    with pytest.raises(ValueError, match="block 0 freed but not allocated"):
        bm.free(ids)
    assert bm.runs() == [(0, 8)] and bm.num_free == 8


def test_free_of_unknown_blocks_frees_none_of_the_list():
    bm = BlockManager(8, 4)
    ids = bm.allocate(3)
    with pytest.raises(ValueError, match="block 99 freed but not allocated"):
        bm.free([ids[0], 99])
    assert bm.num_free == 5  # ids[0] is still allocated
    bm.free(ids)


def test_freeing_the_same_block_twice_in_one_call_is_an_error():
    bm = BlockManager(8, 4)
    ids = bm.allocate(3)
    with pytest.raises(ValueError, match="freed"):
        bm.free([ids[1], ids[1]])
    assert bm.num_free == 5


def test_over_allocation_raises_out_of_blocks():
    bm = BlockManager(8, 4)
    held = bm.allocate(6)
    with pytest.raises(OutOfBlocks, match="3 blocks asked for, 2 free"):
        bm.allocate(3)
    assert bm.num_free == 2  # the failed call took nothing
    bm.allocate(2)
    with pytest.raises(OutOfBlocks, match="no free block"):
        bm.append(held)
    with pytest.raises(ValueError, match="negative"):
        bm.allocate(-1)


@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (16, 0), (-1, 16)])
def test_bad_sizes_are_rejected(num_blocks, block_size):
    with pytest.raises(ValueError, match="num_blocks and block_size must be positive"):
        BlockManager(num_blocks, block_size)


def test_blocks_for_rounds_up():
    bm = BlockManager(8, 4)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
