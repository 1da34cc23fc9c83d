"""The CPU decode-attention kernel (csrc/paged_decode.cpp), built once per machine.

It reads each decode's K and V rows in place from their blocks. Without it the
engine gathers every decode's context into one tensor per layer and runs SDPA
on the copy (three passes over the KV instead of one). The kernel is compiled
on first use with the host's compiler and instruction set; torch keeps the
build in its extensions folder (TORCH_EXTENSIONS_DIR) under a name that holds a
hash of the CPU's flags, so a build copied to another CPU is not loaded there,
and rebuilds it when the source changes. Where it cannot be built (no compiler, no
ninja), the engine says why once and keeps the gather path;
PDMESH_DECODE_KERNEL=0 keeps it too (to compare the two).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"


@functools.cache
def available() -> bool:
    """Whether torch.ops.pdmesh.paged_decode can run here (builds it on the first call;
    concurrent builds of one folder wait on torch's lock file there)."""
    return _load()


def paged_decode(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor, table: torch.Tensor,
                 lo: torch.Tensor, hi: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q: [B, heads, dim] (heads KV-major); *_slots: [slots, kv_heads, dim]; table: [B, width]
    block ids; lo, hi: [B] the attended positions [lo, hi). Returns [B, heads, dim].
    Loads the kernel into this process first (a tensor-parallel worker rank runs the
    inputs rank 0 prepared)."""
    if not available():
        raise RuntimeError("the paged-decode kernel is not built on this host")
    return torch.ops.pdmesh.paged_decode(q, k_slots, v_slots, table, lo, hi, block_size, scale)


def _load() -> bool:
    if os.environ.get("PDMESH_DECODE_KERNEL", "1") == "0":
        log.info("decode attention kernel off (PDMESH_DECODE_KERNEL=0): decoding through gathered KV")
        return False
    try:
        from torch.utils.cpp_extension import load
        cpu = hashlib.sha256(_cpu_flags().encode()).hexdigest()[:12]
        load(name=f"pdmesh_paged_decode_{cpu}", sources=[str(_SOURCE)],
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        return True
    except Exception as e:  # no compiler or ninja: the gather path still serves
        log.warning("decode attention kernel not built (%s); decoding through gathered KV, "
                    "slower: install g++ and ninja to build it", str(e).splitlines()[0] if str(e) else e)
        return False


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (the build uses -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()
