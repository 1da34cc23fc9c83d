"""Projections with an optional oneDNN-blocked copy of the weight, for batched steps on CPU.

MKL's plain fp32 GEMM re-lays the weight out on every call, which dominates for
a few rows: on the small model (2 cores, AVX-512), a decode step's products
took 31.6 ms at batch 16 with plain weights and 25.2 ms with weights blocked
once for oneDNN; for 1-3 rows (13.4 vs 17.0 ms at batch 1) the plain path is
faster, so both copies are kept and the row count picks one. Prefill chunks
(512 and 2048 rows) run faster blocked too, as vLLM's CPU build runs them.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# Rows for which the blocked weight wins (measured, plain vs blocked: 3 rows 2.26 vs 2.58 ms, 4 rows
# 4.36 vs 2.58, 256 rows 32.6 vs 31.8; GFLOP/s of the qkv, gate_up and down products at 512 rows
# 132/150/170 vs 215/208/130, at 2048 rows 178/161/200 vs 209/185/219; a prefill of 8 x 360 tokens
# 2.83 vs 2.65 s): batched decode and the CPU's prefill chunks (a step holds 2048 tokens at most there).
PACKED_MIN_ROWS, PACKED_MAX_ROWS = 4, 2048


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN-blocked weights are used for fp32 on CPU (measured there; bf16 without bf16 units is slow either way)."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def should_pack(requested: bool | None, device: torch.device, dtype: torch.dtype, weight_bytes: int) -> bool:
    """Whether to keep blocked copies: as asked, or by default when they cannot crowd the host's
    memory (the copies double the weights' footprint)."""
    if not packing_supported(device, dtype):
        return False
    if requested is not None:
        return requested
    host_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return weight_bytes * 4 <= host_bytes


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A oneDNN-blocked copy of a [out, in] weight (same values, another memory layout)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 16)


def uses_packed(x: torch.Tensor, packed: torch.Tensor | None) -> bool:
    """Whether x has a row count for which the blocked copy wins (and there is one)."""
    return packed is not None and PACKED_MIN_ROWS <= x.numel() // x.shape[-1] <= PACKED_MAX_ROWS


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias through the weight's blocked copy."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear that `pack()` gives a blocked copy of its weight for many-row products."""

    packed: torch.Tensor | None = None

    def pack(self) -> None:
        self.packed = pack_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_packed(x, self.packed):
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(Linear):
    """A projection whose input features are split across tensor-parallel ranks: each rank
    multiplies its slice, the partial products are summed over the ranks (one all-reduce),
    and the bias, whole on every rank, is added once after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, all_reduce):
        super().__init__(in_features, out_features, bias=bias)
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_linear(x, self.packed, None) if uses_packed(x, self.packed) else F.linear(x, self.weight)
        y = self.all_reduce(y)
        return y if self.bias is None else y + self.bias
