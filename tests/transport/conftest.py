"""Small KV layouts, filled pools and a block reserver that refuses double frees,
shared by the transport tests."""
from __future__ import annotations

import pytest
import torch

from transport.layout import KVLayout
from transport.peer import ListReserver, read_tokens

SECRET = "pdmesh-test-secret-0123456789"


def make_layout(**changes) -> KVLayout:
    """4 layers of 2 x 32-wide heads in blocks of 8: 256 bytes per token and K/V in bf16."""
    fields = {"num_layers": 4, "num_blocks": 64, "block_size": 8, "kv_heads": 2,
              "head_dim": 32, "dtype": torch.bfloat16, **changes}
    return KVLayout(**fields)


def filled(layout: KVLayout, seed: int) -> torch.Tensor:
    pool = layout.allocate()
    pool.copy_(torch.randn(layout.shape, generator=torch.Generator().manual_seed(seed)))
    return pool


def assert_same_kv(src_pool, src_layout, src_ids, dst_pool, dst_layout, dst_ids, num_tokens):
    """The destination holds the source's KV token for token, in its own dtype."""
    want = read_tokens(src_pool, src_layout, src_ids, num_tokens).to("cpu", dst_layout.dtype)
    got = read_tokens(dst_pool, dst_layout, dst_ids, num_tokens).cpu()
    assert torch.equal(got, want)


@pytest.fixture
def reserver():
    """reserver(layout, seed=None) -> a free list, shuffled when seed is given; every
    block must be free again when the test ends."""
    made: list[ListReserver] = []

    def make(layout: KVLayout, seed: int | None = None) -> ListReserver:
        r = ListReserver(layout.num_blocks)
        r.order(seed)
        made.append(r)
        return r

    yield make
    for r in made:
        assert sorted(r.free_ids) == list(range(r.num_blocks)), "KV blocks leaked"
