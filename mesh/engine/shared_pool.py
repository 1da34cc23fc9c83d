"""KV pools in shared memory: a tensor-parallel worker rank's cache, which rank 0's process maps
as well, so that a mesh actor's transport moves each rank's KV heads out of and into that
rank's own pool: no copy onto rank 0, no extra host round trip.

Rank 0 makes one anonymous memory file (memfd) per worker rank, sized for that rank's cache
(zeroed by the kernel) and hands its descriptor to the worker process, which maps the same
pages. The memory goes when the last process holding it unmaps it. Host memory only: a pool
on an accelerator would need the device's IPC handles, which are not built.
"""
from __future__ import annotations

import math
import mmap
import os

import torch

from mesh.engine.errors import EngineError


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
