"""The CPU decode-attention kernel (csrc/paged_decode.cpp, built by cpu_kernels.py).

It reads each decode's K and V rows in place from their blocks. Without it the
engine gathers every decode's context into one tensor per layer and runs SDPA
on the copy (three passes over the KV instead of one). Where the kernels cannot
be built, or with PDMESH_DECODE_KERNEL=0 (to compare the two), the engine keeps
the gather path.
"""
from __future__ import annotations

import torch

from mesh.engine import cpu_kernels


def available() -> bool:
    """Whether torch.ops.pdmesh.paged_decode can run here and is not switched off."""
    return cpu_kernels.enabled("PDMESH_DECODE_KERNEL")


def paged_decode(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, table: torch.Tensor,
                 lo: torch.Tensor, hi: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q: [B, heads, dim] (heads KV-major); *_slots: [slots, kv_heads, dim]; table: [B, width]
    block ids; lo, hi: [B] the attended positions [lo, hi). Returns [B, heads, dim].
    Loads the kernel into this process first (a tensor-parallel worker rank runs the
    inputs rank 0 prepared)."""
    if not available():
        raise RuntimeError("the paged-decode kernel is not built on this host")
    return torch.ops.pdmesh.paged_decode(q, k_slots, v_slots, table, lo, hi, block_size, scale)
