"""What UCX offers on this host, as UCP itself reports it: its version and each transport
resource (transport and device), and whether the RDMA NICs the kernel sees are usable.

The pip wheel of UCX (libucx, brought by ucxx-cu12) is built without verbs/rdmacm:
on a host with RDMA NICs it silently falls back to TCP. This report is how an
operator finds that out before a transfer does.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# UCT transports that run over InfiniBand / RoCE NICs (verbs and the mlx5 accelerated ones)
IB_TRANSPORTS = frozenset({"rc", "rc_verbs", "rc_mlx5", "dc", "dc_mlx5", "ud", "ud_verbs", "ud_mlx5", "gga_mlx5"})
CUDA_TRANSPORTS = frozenset({"cuda_copy", "cuda_ipc", "gdr_copy"})

_RESOURCE = re.compile(r"#\s+resource\s+\d+\s+:\s+md\s+\d+\s+dev\s+\d+\s+flags\s+\S+\s+(\S+)/(\S+)")


@dataclass(frozen=True)
class UcxResource:
    transport: str  # e.g. tcp, cma, rc_mlx5, cuda_ipc
    device: str  # e.g. eth0, memory, mlx5_0:1


@dataclass(frozen=True)
class UcxReport:
    version: str  # "" when UCX cannot load
    resources: tuple[UcxResource, ...]
    rdma_nics: tuple[str, ...]  # what /sys/class/infiniband lists
    error: str = ""  # why UCX could not be asked

    @property
    def transports(self) -> tuple[str, ...]:
        return tuple(sorted({r.transport for r in self.resources}))

    @property
    def has_ib(self) -> bool:
        return any(r.transport in IB_TRANSPORTS for r in self.resources)

    @property
    def has_cuda(self) -> bool:
        return any(r.transport in CUDA_TRANSPORTS for r in self.resources)

    @property
    def rdma_unused(self) -> bool:
        """RDMA NICs are present but this UCX cannot drive them: transfers go over TCP."""
        return bool(self.rdma_nics) and not self.has_ib


def unreachable(resources: tuple[UcxResource, ...], device: str) -> str | None:
    """None when UCX with these resources moves memory of this device type (cpu, cuda, npu)
    itself, else why not. CUDA memory needs cuda_copy (UCX cannot even tell device
    pointers apart without it); cuda_ipc and gdr_copy only speed it up."""
    if device == "cpu":
        return None
    if device != "cuda":
        return f"UCX has no transport for {device} memory"
    if any(r.transport == "cuda_copy" for r in resources):
        return None
    have = ", ".join(sorted({r.transport for r in resources})) or "none"
    return f"this UCX has no cuda_copy transport (no CUDA, or UCX_TLS leaves it out); it has {have}"


def parse_context_info(text: str) -> tuple[UcxResource, ...]:
    """The resources of `ucp_context_print_info` output (ucxx.get_ucp_context_info())."""
    return tuple(UcxResource(m.group(1), m.group(2)) for m in _RESOURCE.finditer(text))


def rdma_nics(sysfs: Path = Path("/sys/class/infiniband")) -> tuple[str, ...]:
    """RDMA devices the kernel sees (InfiniBand, RoCE, iWARP all appear here)."""
    return tuple(sorted(p.name for p in sysfs.iterdir())) if sysfs.is_dir() else ()


def report() -> UcxReport:
    """Asks UCP (a fresh context, under this process's UCX_* settings) what it can use."""
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    nics = rdma_nics()
    try:
        import ucxx

        version = ".".join(str(v) for v in ucxx.get_ucx_version())
        info = ucxx.get_ucp_context_info()
    except Exception as e:  # a missing or broken wheel raises more than ImportError
        return UcxReport("", (), nics, f"{type(e).__name__}: {e}")
    return UcxReport(version, parse_context_info(info), nics)
