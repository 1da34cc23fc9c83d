"""Backend choice by config, with a clear error when one is not available."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..base import KVReceiver, KVSender, TransferError
from ..config import BACKENDS, TransportConfig
from ..layout import KVLayout
from ..lease import BlockReserver

__all__ = ["BACKENDS", "TransportConfig", "available", "make_receiver", "make_sender"]


def _plane(config: TransportConfig):
    if config.backend == "tcp":
        from .tcp import TcpPlane
        return TcpPlane()
    from .ucx import UcxPlane  # imported only when chosen: ucxx starts UCX on import
    return UcxPlane(config.timeout_s)


def make_sender(config: TransportConfig) -> KVSender:
    if config.backend == "local":
        from .local import LocalSender
        return LocalSender(config.gather_threshold)
    from ..session import SocketSender
    return SocketSender(_plane(config), config.secret_bytes, config.timeout_s,
                        config.gather_threshold, config.path)


def make_receiver(config: TransportConfig, pool: torch.Tensor, layout: KVLayout,
                  reserver: BlockReserver, clock: Callable[[], float] = time.monotonic,
                  first_head: int = 0) -> KVReceiver:
    """A receiver for this actor's pool (``first_head``: the model-wide number of its first KV
    head, a tensor-parallel rank's); ``await receiver.start()`` before use. Raises
    ValueError where the config's path cannot serve this pool (direct, unreachable)."""
    receiver = _receiver(config, pool, layout, reserver, clock)
    receiver.first_head = first_head
    return receiver


def _receiver(config: TransportConfig, pool: torch.Tensor, layout: KVLayout,
              reserver: BlockReserver, clock: Callable[[], float]) -> KVReceiver:
    if config.backend == "local":
        from .local import LocalReceiver
        return LocalReceiver(pool, layout, reserver, config.lease_ttl_s, clock)
    from ..address import LOOPBACK, for_node
    from ..session import SocketReceiver
    if not config.host:  # not placed on a node by its caller: loopback unless the environment says
        config = for_node(config, LOOPBACK)
    return SocketReceiver(_plane(config), pool, layout, reserver, config.secret_bytes,
                          config.host, config.port, config.lease_ttl_s, config.timeout_s, clock,
                          limits=config.limits, handshake_timeout_s=config.handshake_timeout_s,
                          path=config.path)


def available(backend: str) -> str | None:
    """None when the backend can run here, else why not."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    if backend == "ucx":
        try:
            from .ucx import load_ucxx
            load_ucxx()
        except TransferError as e:
            return str(e)
    return None
