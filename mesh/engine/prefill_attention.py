"""The CPU prompt-attention kernel (csrc/prefill_attention.cpp, built by cpu_kernels.py).

A prefill chunk's causal attention over its context, fp32, heads of 16 to 128 (powers of two)
and up to 8 query heads per KV head, read from the cache in place where the
context is one run of blocks. Elsewhere (other dtypes or shapes, GPUs and NPUs,
no compiler, or PDMESH_PREFILL_KERNEL=0 to compare the two) chunks run torch's
SDPA with a mask.
"""
from __future__ import annotations

import torch

from mesh.engine import cpu_kernels

HEAD_DIMS = (16, 32, 64, 128)
MAX_GROUP = 8


def usable(device: torch.device, dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int) -> bool:
    """Whether the kernel runs this model's prompts here."""
    if device.type != "cpu" or dtype != torch.float32 or head_dim not in HEAD_DIMS:
        return False
    if heads % kv_heads or heads // kv_heads > MAX_GROUP:
        return False
    return cpu_kernels.enabled("PDMESH_PREFILL_KERNEL")


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                      scale: float) -> torch.Tensor:
    """q: [q_len, heads, dim] (heads KV-major), the last q_len positions of the context;
    k, v: [ctx_len, kv_heads, dim]; window: the sliding window (None: none). Returns
    [q_len, heads, dim]. Loads the kernels into this process first (a tensor-parallel worker
    rank runs the inputs rank 0 prepared)."""
    if not cpu_kernels.available():
        raise RuntimeError("the prompt-attention kernel is not built on this host")
    return torch.ops.pdmesh.prefill_attention(q, k, v, window or 0, scale)
