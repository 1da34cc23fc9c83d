"""Transport settings, validated when made."""

from __future__ import annotations

from dataclasses import dataclass

from .admission import ConnectionLimits
from .path import Path
from .plan import DEFAULT_GATHER_THRESHOLD

BACKENDS = ("ucx", "tcp", "local")


@dataclass(frozen=True)
class TransportConfig:
    backend: str = "ucx"
    secret: str = ""           # the mesh's shared token; required by ucx and tcp
    host: str = ""             # where the receiver listens and what senders dial; "": this
                               # node's address (transport/address.py), loopback outside a cluster
    interface: str = ""        # or a NIC whose address to use (also pins UCX to it)
    port: int = 0              # 0: any free port
    lease_ttl_s: float = 30.0
    timeout_s: float = 10.0    # bound on every network wait
    gather_threshold: int = DEFAULT_GATHER_THRESHOLD
    # auto: direct where the data plane reaches the pool's memory (host; CUDA where UCX has
    # its CUDA transports), else staged through host buffers; direct or staged force it.
    path: str = "auto"
    # The receiver's control connections (admission.py). Senders on one host share its
    # address: each keeps a few idle connections per receiver and opens one per
    # concurrent transfer, so the per-address bound is generous.
    max_connections: int = 64           # authenticated, from anyone
    max_handshakes: int = 256           # not yet authenticated, from anyone
    max_handshakes_per_peer: int = 64   # not yet authenticated, from one address
    handshake_timeout_s: float = 5.0    # a connection that has not authenticated by then goes

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown transport backend {self.backend!r}; "
                             f"choose one of {', '.join(BACKENDS)}")
        if self.backend != "local" and len(self.secret) < 16:
            raise ValueError(f"the {self.backend} backend needs a shared secret of 16+ chars")
        if (self.lease_ttl_s <= 0 or self.timeout_s <= 0 or self.gather_threshold < 1
                or self.handshake_timeout_s <= 0):
            raise ValueError("lease_ttl_s, timeout_s, handshake_timeout_s and gather_threshold "
                             "must be positive")
        if self.path not in {p.value for p in Path}:
            raise ValueError(f"unknown transport path {self.path!r}; choose one of "
                             f"{', '.join(p.value for p in Path)}")
        if self.backend == "local" and self.path == Path.STAGED:
            raise ValueError("the local backend copies within one process: path staged needs "
                             "the ucx or tcp backend")
        _ = self.limits  # made here so that limits which cannot hold fail when the config is made

    @property
    def limits(self) -> ConnectionLimits:
        return ConnectionLimits(self.max_connections, self.max_handshakes,
                                self.max_handshakes_per_peer)

    @property
    def secret_bytes(self) -> bytes:
        return self.secret.encode()
