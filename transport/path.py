"""The way one side's KV bytes take to the wire: direct, where the data plane reads or
writes the pool's own memory (host memory; CUDA memory that UCX registers: cuda_copy,
cuda_ipc between processes on one node, GPUDirect RDMA across nodes where the NIC and UCX
allow), or staged, through host buffers that a copy stream fills or empties layer by
layer (NPU HBM, which no UCX transport reaches; a UCX without CUDA transports; the tcp
data plane, which reads and writes host memory only).

Each side chooses for its own pool from what its data plane reports (``DataPlane.reaches``),
never from an assumption, and tells the other side in the handshake: a transfer is
direct only when both sides are. Dtype and block-size conversions never force staging:
the gather that converts runs on the pool's own device.
"""

from __future__ import annotations

from enum import Enum


class Path(str, Enum):
    AUTO = "auto"      # direct where the data plane reaches the pool's memory, else staged
    DIRECT = "direct"  # direct, or a clear error where it cannot be
    STAGED = "staged"  # always through host buffers (on CPU pools too: the staged code runs everywhere)


def choose(wanted: Path | str, device: str, unreachable: str | None) -> Path:
    """This side's path for a pool on ``device``; ``unreachable``: why the data plane cannot
    move that memory itself (None: it can). Raises ValueError for direct where it cannot be."""
    wanted = Path(wanted)
    if wanted is Path.STAGED:
        return Path.STAGED
    if unreachable is None:
        return Path.DIRECT
    if wanted is Path.DIRECT:
        raise ValueError(f"path direct for a {device} pool: {unreachable}; use path auto or staged")
    return Path.STAGED


def joined(*paths: Path | str) -> Path:
    """The transfer's path from both sides' paths."""
    return Path.STAGED if Path.STAGED in {Path(p) for p in paths} else Path.DIRECT
