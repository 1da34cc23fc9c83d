"""Transport settings, validated when made."""

from __future__ import annotations

from dataclasses import dataclass

from .plan import DEFAULT_GATHER_THRESHOLD

BACKENDS = ("ucx", "tcp", "local")


@dataclass(frozen=True)
class TransportConfig:
    backend: str = "ucx"
    secret: str = ""           # the mesh's shared token; required by ucx and tcp
    host: str = "127.0.0.1"    # where the receiver listens for control connections
    port: int = 0              # 0: any free port
    lease_ttl_s: float = 30.0
    timeout_s: float = 10.0    # bound on every network wait
    gather_threshold: int = DEFAULT_GATHER_THRESHOLD

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown transport backend {self.backend!r}; "
                             f"choose one of {', '.join(BACKENDS)}")
        if self.backend != "local" and len(self.secret) < 16:
            raise ValueError(f"the {self.backend} backend needs a shared secret of 16+ chars")
        if self.lease_ttl_s <= 0 or self.timeout_s <= 0 or self.gather_threshold < 1:
            raise ValueError("lease_ttl_s, timeout_s and gather_threshold must be positive")

    @property
    def secret_bytes(self) -> bytes:
        return self.secret.encode()
