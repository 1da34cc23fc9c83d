"""StagingPool: buffers reused across transfers of different lengths (a fresh buffer's pages are
slow to touch), the largest kept."""
from __future__ import annotations

import torch

from transport.copy import StagingPool


def counting_pool(max_free: int = 64) -> tuple[StagingPool, list[int]]:
    made: list[int] = []

    def allocate(n: int) -> torch.Tensor:
        made.append(n)
        return torch.zeros(n, dtype=torch.uint8)
    return StagingPool(allocate, max_free), made


def test_a_shorter_or_slightly_longer_request_reuses_a_free_buffer():
    pool, made = counting_pool()
    first = pool.take(1000)
    assert first.numel() == 1000 and made == [1024]  # rounded up by at most an eighth
    pool.give([first])
    for n in (10, 1000, 1024):
        buf = pool.take(n)
        assert buf.numel() == n and buf.data_ptr() == first.data_ptr()
        pool.give([buf])
    assert made == [1024]
    longer = pool.take(1025)
    assert made == [1024, 1152] and longer.data_ptr() != first.data_ptr()


def test_a_take_gets_the_smallest_buffer_that_holds_it_and_the_largest_stay_free():
    pool, made = counting_pool(max_free=2)
    bufs = [pool.take(n) for n in (64, 128, 256)]
    pool.give(bufs)  # three free, two kept: the largest
    assert pool.take(16).data_ptr() == bufs[1].data_ptr()
    assert pool.take(16).data_ptr() == bufs[2].data_ptr()
    assert made == [64, 128, 256]
    pool.take(16)
    assert made == [64, 128, 256, 16]  # the smallest went back to the allocator's memory
