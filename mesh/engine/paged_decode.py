"""The CPU decode-attention kernel (csrc/paged_decode.cpp), built once per machine.

It reads each decode's K and V rows in place from their blocks. Without it the
engine gathers every decode's context into one tensor per layer and runs SDPA
on the copy (three passes over the KV instead of one). The kernel is compiled
on first use with the host's compiler and instruction set; torch keeps the
build in its extensions folder (TORCH_EXTENSIONS_DIR) under a name that holds a
hash of the CPU's flags and of the source, so a build copied to another CPU is
not loaded there, and a changed source is built anew. Where it cannot be built (no compiler, no
ninja), the engine says why once and keeps the gather path;
PDMESH_DECODE_KERNEL=0 keeps it too (to compare the two).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
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
        from torch.utils import cpp_extension
        built = library_path()
        if built.exists():
            # Loaded directly: torch's build path takes a lock file in the build folder even
            # when there is nothing to build, and a process killed holding it would leave
            # every later start waiting on it.
            torch.ops.load_library(str(built))
            return True
        _clear_stale_lock(built.parent)
        cpp_extension.load(name=built.stem, sources=[str(_SOURCE)],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
        return True
    except Exception as e:  # no compiler or ninja: the gather path still serves
        log.warning("decode attention kernel not built (%s); decoding through gathered KV, "
                    "slower: install g++ and ninja to build it", str(e).splitlines()[0] if str(e) else e)
        return False


def library_path() -> Path:
    """Where the kernel for this CPU and this source is built (torch's extensions folder)."""
    from torch.utils import cpp_extension
    key = hashlib.sha256(_cpu_flags().encode() + _SOURCE.read_bytes()).hexdigest()[:16]
    name = f"pdmesh_paged_decode_{key}"
    return Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so"


def _clear_stale_lock(folder: Path, older_than_s: float = 600.0) -> None:
    """A build takes under a minute: a lock file older than that was left by a killed build."""
    lock = folder / "lock"
    try:
        if time.time() - lock.stat().st_mtime > older_than_s:
            lock.unlink()
    except FileNotFoundError:
        pass


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (the build uses -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()
