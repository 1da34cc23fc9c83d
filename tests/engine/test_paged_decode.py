"""The CPU paged-decode kernel against the gather-and-SDPA path it replaces."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mesh.engine import cpu_kernels, paged_decode
from mesh.engine.attention import AttentionMetadata, paged_attention


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the engine decodes through gathered KV here")
    assert paged_decode.available(), "a compiler is present, so the kernel must build"


def attend(q, k_cache, v_cache, blocks, lo, hi, block_size, kernel):
    """Decode attention for one token per sequence through paged_attention, with the
    kernel's metadata or the gather path's."""
    batch = len(blocks)
    width = max(map(len, blocks))
    table = torch.tensor([b + [0] * (width - len(b)) for b in blocks])
    lo_t, hi_t = torch.tensor(lo), torch.tensor(hi)
    # the new tokens' K/V: rewrite each sequence's last slot with what is already there
    last = table.gather(1, ((hi_t - 1) // block_size)[:, None])[:, 0] * block_size + (hi_t - 1) % block_size
    meta = AttentionMetadata(slot_mapping=last, num_decodes=batch)
    if kernel:
        meta.decode_table, meta.decode_lo, meta.decode_hi, meta.block_size = table, lo_t, hi_t, block_size
    else:
        span = torch.arange(int(hi_t.max()))
        meta.decode_slots = (table[:, span // block_size] * block_size + span % block_size).view(-1)
        meta.decode_mask = ((span[None, :] < hi_t[:, None]) & (span[None, :] >= lo_t[:, None]))[:, None, None, :]
    return paged_attention(q, k_cache[last].clone(), v_cache[last].clone(), k_cache, v_cache, meta,
                           q.shape[-1] ** -0.5)


@pytest.mark.parametrize("dtype,dim,heads,kv_heads", [
    (torch.float32, 64, 12, 4),   # the vectorised path (group 3)
    (torch.float32, 128, 8, 1),   # vectorised, group 8
    (torch.float32, 128, 4, 4),   # vectorised, no grouping
    (torch.float32, 48, 6, 2),    # any head size: the scalar path
    (torch.float32, 64, 18, 2),   # group 9: the scalar path
    (torch.bfloat16, 64, 8, 2),   # other dtypes: the scalar path
])
def test_kernel_equals_gather_path(dtype, dim, heads, kv_heads):
    gen = torch.Generator().manual_seed(0)
    block_size, num_blocks = 16, 64
    k_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()  # blocks out of order, as a pool hands them out
    lengths = [1, 17, 200, 33]
    blocks, at = [], 0
    for n in lengths:
        need = -(-n // block_size)
        blocks.append(order[at:at + need])
        at += need
    lo = [0, 5, 60, 0]  # sliding windows start later
    q = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)
    got = attend(q, k_cache, v_cache, blocks, lo, lengths, block_size, kernel=True)
    want = attend(q, k_cache, v_cache, blocks, lo, lengths, block_size, kernel=False)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_kernel_refuses_mismatched_inputs():
    q = torch.randn(2, 4, 64)
    cache = torch.randn(32, 2, 32)
    table, bounds = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="head dims differ"):
        paged_decode.paged_decode(q, cache, cache, table, bounds - 1, bounds, 16, 0.125)
    with pytest.raises(RuntimeError, match="int64"):
        paged_decode.paged_decode(q, torch.randn(32, 2, 64), torch.randn(32, 2, 64), table.int(), bounds - 1,
                                  bounds, 16, 0.125)
    with pytest.raises(RuntimeError, match="outside the cache"):
        paged_decode.paged_decode(q, torch.randn(32, 2, 64), torch.randn(32, 2, 64), table + 2, bounds - 1,
                                  bounds, 16, 0.125)


def test_a_built_kernel_loads_past_a_lock_file_left_in_its_folder():
    """A process killed while torch's build step held its lock file leaves the file behind;
    a built kernel loads without that step, so later engines still start."""
    lock = cpu_kernels.library_path().parent / "lock"
    lock.touch()
    try:
        code = "from mesh.engine import paged_decode; assert paged_decode.available()"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    finally:
        lock.unlink()
