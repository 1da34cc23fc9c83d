"""The device layer: picks `npu`, `cuda` or `cpu` and the dtype to compute in."""
from __future__ import annotations

import ctypes
import importlib
import logging

import torch

from mesh.engine.errors import EngineError

log = logging.getLogger(__name__)

DEVICE_KINDS = ("auto", "cpu", "cuda", "npu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def npu_available() -> bool:
    """True when torch_npu imports and sees an Ascend device (needs Huawei's CANN)."""
    try:
        importlib.import_module("torch_npu")
    except Exception:  # torch_npu fails with OSError/ImportError without CANN
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


def resolve_device(kind: str = "auto") -> torch.device:
    """Returns the device for `kind`; `auto` prefers npu, then cuda, then cpu."""
    if kind not in DEVICE_KINDS:
        raise EngineError(f"unknown device {kind!r}: use one of {', '.join(DEVICE_KINDS)}")
    if kind == "auto":
        if npu_available():
            return torch.device("npu", 0)
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("cpu")
    if kind == "npu" and not npu_available():
        raise EngineError("device 'npu' asked for, but torch_npu or an Ascend device is missing: "
                          "install pdmesh[npu] with Huawei's CANN, or pick another device")
    if kind == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' asked for, but torch sees no CUDA GPU: "
                          "install a CUDA build of torch, or pick another device")
    return torch.device(kind, 0) if kind != "cpu" else torch.device("cpu")


def cpu_has_fast_half() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX).

    Without it, bf16/fp16 matmuls fall back to a path about 8x slower than fp32
    (measured on AVX2 hosts), so fp32 is the faster compute dtype there.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_host_memory() -> bool:
    """Makes glibc keep freed memory for the next allocation instead of unmapping it.

    By default glibc maps every large block fresh and unmaps it when freed, so each
    step's activations fault their pages in again (about 0.5 GB/s on these VMs):
    prefill 8 x 512 ran 12% faster without that. Process-wide, as serving processes
    do with tcmalloc. Returns False where the C library has no mallopt (not glibc).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def resolve_dtype(requested: str, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype weights and KV are kept and computed in.

    `auto` keeps the checkpoint's dtype, except on a CPU without native half
    precision matmuls, where it computes in fp32.
    """
    if requested != "auto":
        if requested not in DTYPES:
            raise EngineError(f"unknown dtype {requested!r}: use auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    if device.type == "cpu" and checkpoint_dtype != torch.float32 and not cpu_has_fast_half():
        log.info("CPU has no native bf16/fp16 matmul: computing in float32")
        return torch.float32
    return checkpoint_dtype
