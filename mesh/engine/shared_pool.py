"""The one place that shares a tensor-parallel worker rank's KV pool with rank 0's process, so that
a mesh actor's transport moves each rank's KV heads out of and into that rank's own pool: no
copy onto rank 0, no extra host round trip.

How follows the device (`mechanism`):
- CPU (memfd): rank 0 makes one anonymous memory file per worker rank, sized for that rank's
  cache (zeroed by the kernel), and hands its descriptor to the worker process, which maps the
  same pages. The memory goes when the last process holding it unmaps it.
- CUDA, and NPUs whose torch_npu shares device memory (ipc): the worker allocates its pool on
  its own device and hands rank 0 torch's IPC handle of it (`export_pool`: what
  torch.multiprocessing.reductions.reduce_tensor gives, which torch_npu extends to NPU
  tensors) in its Ready message over the local control pipe; rank 0 opens it (`open_pool`). The
  worker keeps its pool for as long as it lives, as torch's IPC asks of the producer.
  Ordering: a worker's writes to its pool precede, on its stream, the all-reduce that ends
  each layer, so once rank 0 has a step's (or a layer's) result, that rank's KV is written;
  KV the transport lands in a worker's pool is committed (synchronized) before the step
  that reads it is sent.
- Otherwise (an NPU without torch_npu's IPC) the pools are not shared: `UnsharedPools` says why
  and what to do. The engine still runs (`pdmesh generate`); a mesh actor refuses it.
"""
from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.multiprocessing import reductions

from mesh.engine.errors import EngineError

MEMFD, IPC = "memfd", "ipc"


class UnsharedPools(EngineError):
    """Worker ranks' pools on this device cannot be mapped by rank 0's process."""


def mechanism(device_type: str) -> str:
    """For pools on a device of this type (cpu, cuda, npu): MEMFD on the CPU, IPC on CUDA and on
    NPUs whose torch_npu shares device memory; else UnsharedPools, saying what to do."""
    if device_type == "cpu":
        return MEMFD
    if device_type == "cuda" or hasattr(torch.UntypedStorage, "_share_npu_"):  # torch_npu's IPC (reduce_tensor)
        return IPC
    raise UnsharedPools(
        f"the KV pools of tensor-parallel worker ranks on {device_type} cannot be shared with rank 0's process: "
        "this torch_npu has no IPC for device memory (UntypedStorage._share_npu_; Ascend Extension for PyTorch "
        "documents it from 7.2.0, on Ascend HDK 25.0.RC1 or later), so a mesh actor cannot move their KV heads. "
        "Run prefill and decode at tensor_parallel_size 1 (one NPU per actor), or use "
        "`pdmesh generate --tensor-parallel-size N`, which needs no sharing")


def create(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    """A zeroed pool in a new memory file: (its descriptor, inheritable, and this process's map)."""
    fd = os.memfd_create("pdmesh-kv", 0)
    os.ftruncate(fd, math.prod(shape) * dtype.itemsize)
    return fd, attach(fd, shape, dtype)


def attach(fd: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The pool in memory file `fd` (made by `create` for the same shape and dtype)."""
    nbytes = math.prod(shape) * dtype.itemsize
    size = os.fstat(fd).st_size
    if size != nbytes:
        raise EngineError(f"the shared KV pool holds {size} bytes, this rank's cache needs {nbytes}: "
                          "rank 0 and the worker disagree on the cache's shape")
    region = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)  # holds `region` alive


@dataclass(frozen=True)
class DevicePoolHandle:
    """A worker's KV pool on its accelerator as another process on this host opens it: torch's
    rebuild function and its arguments (the device, the memory's IPC handle, sizes, the ref
    counter's and the producer's event's handles). Meaningful on this host only, and sent over
    the local control pipe only."""
    rebuild: Callable[..., torch.Tensor]
    args: tuple


def export_pool(pool: torch.Tensor) -> DevicePoolHandle:
    """The handle of a pool on a device (its whole storage), for `open_pool` in rank 0's process."""
    rebuild, args = reductions.reduce_tensor(pool)
    return DevicePoolHandle(rebuild, args)


def open_pool(handle: DevicePoolHandle, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The worker's pool, mapped into this process; its shape and dtype must be this rank's cache's."""
    pool = handle.rebuild(*handle.args)
    if tuple(pool.shape) != tuple(shape) or pool.dtype != dtype:
        raise EngineError(f"the shared KV pool is {tuple(pool.shape)} {pool.dtype}, this rank's cache is "
                          f"{tuple(shape)} {dtype}: rank 0 and the worker disagree on the cache's shape")
    return pool
