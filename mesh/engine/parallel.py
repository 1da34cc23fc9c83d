"""Collectives between the tensor-parallel ranks of one engine, through torch.distributed.

The backend follows the device: gloo on CPU, NCCL on CUDA, HCCL on Ascend (torch_npu).
Each engine makes its own process group over a TCPStore that rank 0 hosts on a free
port, not torch's global default group, so one process may hold several engines. Every
collective waits at most the group's timeout: a rank that died or hangs fails the step
with TensorParallelError, never blocks the engine.
"""
from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from mesh.engine.errors import EngineError

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


class TensorParallelError(EngineError):
    """A collective failed (a rank died or timed out): the engine cannot go on."""


def check_devices(device: torch.device, size: int) -> None:
    """NCCL refuses two ranks of one group on one GPU ("Duplicate GPU detected", since NCCL 2.5):
    on CUDA every rank needs a GPU of its own, among those this process sees."""
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise TensorParallelError(
            f"{size} tensor-parallel ranks on CUDA need {size} GPUs (NCCL refuses two ranks on one GPU), this "
            f"process sees {torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES): make {size} visible, or lower "
            "tensor_parallel_size")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th accelerator (on NPUs, ranks share them round robin when there are
    fewer; on CUDA check_devices refuses that first)."""
    if device.type == "cpu":
        return device
    count = torch.cuda.device_count() if device.type == "cuda" else torch.npu.device_count()
    return torch.device(device.type, rank % count)


def host_store(size: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """Rank 0's rendezvous, on a free loopback port (its `port` is what the other ranks join)."""
    return dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=timeout, wait_for_workers=False)


def join_store(port: int, size: int, timeout: datetime.timedelta) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timeout)


def process_group(store: dist.Store, rank: int, size: int, device: torch.device,
                  timeout: datetime.timedelta) -> dist.ProcessGroup:
    """This engine's group; returns once every rank has joined (or raises after the timeout)."""
    try:
        if device.type == "cpu":
            return dist.ProcessGroupGloo(store, rank, size, timeout)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            return dist.ProcessGroupNCCL(store, rank, size, options)
        from torch_npu._C._distributed_c10d import ProcessGroupHCCL  # Ascend: needs CANN
        options = ProcessGroupHCCL.Options()
        options._timeout = timeout
        return ProcessGroupHCCL(store, rank, size, options)
    except RuntimeError as e:
        raise TensorParallelError(f"rank {rank} could not join the {BACKENDS[device.type]} group of "
                                  f"{size} ranks within {timeout.total_seconds():.0f} s: {e}") from None


class Collectives:
    """The two collectives the sharded model needs; bound to the group once every rank is up."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        self.group: dist.ProcessGroup | None = None
        # Collectives run and the time spent in them (transfer, and waiting for the slowest
        # rank), for benchmarks to show what tensor parallelism costs.
        self.calls, self.seconds = 0, 0.0

    def bind(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place."""
        self._run(lambda: self.group.allreduce([x]), "all-reduce")
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x, concatenated along the last dim in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._run(lambda: self.group.allgather([parts], [x.contiguous()]), "all-gather")
        return torch.cat(parts, dim=-1)

    def _run(self, collective, what: str) -> None:
        start = time.perf_counter()
        try:
            collective().wait()
            self.calls += 1
            self.seconds += time.perf_counter() - start
        except RuntimeError as e:
            raise TensorParallelError(f"tensor-parallel {what} failed on rank {self.rank} of {self.size}: {e}") \
                from None
