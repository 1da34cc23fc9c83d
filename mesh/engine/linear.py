"""Projections with optional copies of the weight laid out for steps on CPU.

MKL's plain fp32 GEMM re-lays the weight out on every call, which dominates for
a few rows: on the small model (2 cores, AVX-512 with bf16 units), a decode step
took 29-30 ms at batch 1 and 53-58 ms at batch 2 with plain weights, 22 and 25
ms with weights blocked once for oneDNN (the LM head's 32000 x 768 product ran
at 6-7 GFLOP/s plain, 13-55 blocked, for 1-3 rows). Prefill chunks (512 and
2048 rows) run faster blocked too, as vLLM's CPU build runs them. A decode
step's few rows are bound by reading the weights, which oneDNN's blocked product
did at 21-24 GB/s of the host's 30: up to FEW_ROWS_MAX rows go through the
few-row kernel (csrc/few_row_linear.cpp) and its own copy of the weight instead
(the small model's 12 layers at 8 rows: 8.6 against 12.8 ms).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mesh.engine import cpu_kernels

# Rows for which the blocked weight wins (measured, plain vs blocked GFLOP/s of the qkv, gate_up and
# down products: 1 row 27/26/30 vs 40/59/54, 8 rows 78/66/57 vs 143/176/155, 512 rows 194/164/174 vs
# 205/201/207, 2048 rows 190/158/196 vs 212/182/216): every step up to the CPU's step budget (2048).
PACKED_MIN_ROWS, PACKED_MAX_ROWS = 1, 2048
# Rows up to which the few-row kernel beats oneDNN's blocked product (12 layers of the small
# model, cold weights: 1 row 9.6 vs 12.2 ms, 4 rows 7.5 vs 9.8, 8 rows 8.6 vs 12.8, 16 rows even).
FEW_ROWS_MAX = 8


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN-blocked weights are used for fp32 on CPU (measured there; bf16 without bf16 units is slow either way)."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def should_pack(requested: bool | None, device: torch.device, dtype: torch.dtype, weight_bytes: int) -> bool:
    """Whether to keep the CPU copies: as asked, or by default when they cannot crowd the host's
    memory (with the two copies the weights take three times their size)."""
    if not packing_supported(device, dtype):
        return False
    if requested is not None:
        return requested
    host_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return weight_bytes * 6 <= host_bytes


@dataclass(frozen=True)
class PackedWeight:
    """A [out, in] weight's copies for CPU products: oneDNN-blocked, and for the few-row kernel
    (None where the kernel is not built or is switched off)."""
    blocked: torch.Tensor
    few_rows: torch.Tensor | None
    out_features: int


def few_row_kernel() -> bool:
    """Whether the few-row kernel runs here (PDMESH_FEW_ROW_KERNEL=0 keeps oneDNN, to compare)."""
    return cpu_kernels.enabled("PDMESH_FEW_ROW_KERNEL")


def pack_weight(weight: torch.Tensor) -> PackedWeight:
    """The weight's CPU copies (same values, other memory layouts)."""
    w = weight.detach().contiguous()
    few = torch.ops.pdmesh.few_row_pack(w) if few_row_kernel() else None
    return PackedWeight(torch.ops.mkldnn._reorder_linear_weight(w, 16), few, w.shape[0])


def uses_packed(x: torch.Tensor, packed: PackedWeight | None) -> bool:
    """Whether x has a row count for which a packed copy wins (and there is one)."""
    return packed is not None and PACKED_MIN_ROWS <= x.numel() // x.shape[-1] <= PACKED_MAX_ROWS


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias through the copy that suits x's row count."""
    if packed.few_rows is not None and x.numel() // x.shape[-1] <= FEW_ROWS_MAX:
        return torch.ops.pdmesh.few_row_linear(x, packed.few_rows, bias, packed.out_features)
    return torch.ops.mkldnn._linear_pointwise(x, packed.blocked, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear that `pack()` gives CPU copies of its weight (PackedWeight)."""

    packed: PackedWeight | None = None

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
