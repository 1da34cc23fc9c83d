"""What the transport tests share: small KV layouts, filled pools, a KV comparison and the
peers' shared secret."""
from __future__ import annotations

import torch

from transport.layout import KVLayout
from transport.peer import read_tokens

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
