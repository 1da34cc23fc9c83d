"""The CPU prompt-attention kernel against the masked-SDPA path it replaces."""
import shutil

import pytest
import torch

from mesh.engine import cpu_kernels, prefill_attention
from mesh.engine.attention import AttentionMetadata, PrefillChunk, causal_mask, paged_attention


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: prompts run torch's SDPA here")
    assert prefill_attention.usable(torch.device("cpu"), torch.float32, 64, 12, 4), \
        "a compiler is present, so the kernel must build"


def attend(q, k, v, chunks, window, kernel):
    """paged_attention over prefill chunks only: each (q_start, q_len, ctx_len, ctx_slots)."""
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), prefill_kernel=kernel, window=window)
    for q_start, q_len, ctx_len, slots in chunks:
        mask = None if kernel else causal_mask(q_len, ctx_len, window, q.device)
        meta.prefills.append(PrefillChunk(q_start, q_len, ctx_len, slots, mask))
    none = torch.empty(0, *k.shape[1:])
    return paged_attention(q, none, none, k, v, meta, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("dim,heads,kv_heads", [(64, 12, 4), (128, 8, 1), (16, 4, 2), (32, 6, 6), (64, 16, 2)])
@pytest.mark.parametrize("window", [None, 5, 40])
def test_kernel_equals_masked_sdpa(dim, heads, kv_heads, window):
    gen = torch.Generator().manual_seed(0)
    slots = 512
    k = torch.randn(slots, kv_heads, dim, generator=gen)
    v = torch.randn(slots, kv_heads, dim, generator=gen)
    # one step's q and k, as the model makes them: q heads and k heads in one tensor
    qk = torch.randn(1 + 77 + 33, heads + kv_heads, dim, generator=gen)
    q = qk[:, :heads]
    chunks = [
        (0, 1, 1, slice(0, 1)),  # a one-token prompt
        (1, 77, 77, slice(100, 177)),  # a whole prompt, its blocks one run
        # the rest of a prompt after 150 tokens computed before, its blocks scattered
        (78, 33, 183, torch.randperm(slots, generator=gen)[:183]),
    ]
    got = attend(q, k, v, chunks, window, kernel=True)
    want = attend(q, k, v, chunks, window, kernel=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kernel_refuses_inputs_it_cannot_run():
    q, kv = torch.randn(4, 8, 64), torch.randn(6, 2, 64)
    with pytest.raises(RuntimeError, match="4 queries in a context of 3"):
        torch.ops.pdmesh.prefill_attention(q, kv[:3], kv[:3], 0, 0.125)
    with pytest.raises(RuntimeError, match="head dims differ"):
        torch.ops.pdmesh.prefill_attention(q, torch.randn(6, 2, 32), torch.randn(6, 2, 32), 0, 0.125)
    with pytest.raises(RuntimeError, match="no kernel for heads of 48"):
        torch.ops.pdmesh.prefill_attention(torch.randn(4, 8, 48), torch.randn(6, 2, 48), torch.randn(6, 2, 48), 0, 1.0)
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.pdmesh.prefill_attention(q.double(), kv.double(), kv.double(), 0, 0.125)
    with pytest.raises(RuntimeError, match="window must be 0"):
        torch.ops.pdmesh.prefill_attention(q, kv, kv, -1, 0.125)


@pytest.mark.parametrize("dtype,dim,heads,kv_heads,device", [
    (torch.bfloat16, 64, 12, 4, "cpu"),  # other dtypes
    (torch.float32, 48, 6, 2, "cpu"),  # other head sizes
    (torch.float32, 64, 18, 2, "cpu"),  # groups over 8
    (torch.float32, 64, 12, 4, "meta"),  # not a CPU
])
def test_other_models_and_devices_keep_sdpa(dtype, dim, heads, kv_heads, device):
    assert not prefill_attention.usable(torch.device(device), dtype, dim, heads, kv_heads)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("PDMESH_PREFILL_KERNEL", "0")
    cpu_kernels.enabled.cache_clear()
    try:
        assert not prefill_attention.usable(torch.device("cpu"), torch.float32, 64, 12, 4)
    finally:
        cpu_kernels.enabled.cache_clear()
