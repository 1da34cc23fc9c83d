"""Projections with an optional oneDNN-blocked copy of the weight, for steps on CPU.

MKL's plain fp32 GEMM re-lays the weight out on every call, which dominates for
a few rows: on the small model (2 cores, AVX-512 with bf16 units), a decode step
took 29-30 ms at batch 1 and 53-58 ms at batch 2 with plain weights, 22 and 25
ms with weights blocked once for oneDNN (the LM head's 32000 x 768 product ran
at 6-7 GFLOP/s plain, 13-55 blocked, for 1-3 rows). Prefill chunks (512 and
2048 rows) run faster blocked too, as vLLM's CPU build runs them.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# Rows for which the blocked weight wins (measured, plain vs blocked GFLOP/s of the qkv, gate_up and
# down products: 1 row 27/26/30 vs 40/59/54, 8 rows 78/66/57 vs 143/176/155, 512 rows 194/164/174 vs
# 205/201/207, 2048 rows 190/158/196 vs 212/182/216): every step up to the CPU's step budget (2048).
PACKED_MIN_ROWS, PACKED_MAX_ROWS = 1, 2048


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
