"""Which control connections a KV receiver keeps: a plain policy over counts, no sockets.

Invariants: at most ``max_handshakes`` connections are in the handshake at once, and at
most ``max_handshakes_per_peer`` of them come from one remote address; at most
``max_connections`` have finished it. A connection in the handshake holds no
authenticated slot, so peers without the mesh's token cannot take the slots of those with
it. Past ``max_handshakes`` the oldest handshake makes room: a real sender finishes its
handshake in one round trip, an idle connection never does.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int          # authenticated connections
    max_handshakes: int           # connections still in the handshake, from anyone
    max_handshakes_per_peer: int  # ... and from one remote address

    def __post_init__(self) -> None:
        if min(self.max_connections, self.max_handshakes, self.max_handshakes_per_peer) < 1:
            raise ValueError("max_connections, max_handshakes and max_handshakes_per_peer "
                             "must be at least 1")
        if self.max_handshakes_per_peer > self.max_handshakes:
            raise ValueError(f"max_handshakes_per_peer ({self.max_handshakes_per_peer}) cannot "
                             f"exceed max_handshakes ({self.max_handshakes})")


@dataclass(frozen=True)
class ConnectionCounts:
    """What a receiver holds now: for tests, status and metrics."""

    authenticated: int
    handshaking: int
    handshaking_by_peer: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Arrival:
    """A new connection's fate: refused (with why), or admitted, perhaps evicting the
    oldest handshake (``evicted``, with why that one goes)."""

    refused: str | None = None
    evicted: Hashable | None = None
    evicted_why: str | None = None


class Admission:
    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._handshaking: dict[Hashable, str] = {}  # key -> peer address, oldest first
        self._per_peer: dict[str, int] = {}
        self._authenticated: set[Hashable] = set()

    def arrive(self, key: Hashable, peer: str) -> Arrival:
        lim = self.limits
        if self._per_peer.get(peer, 0) >= lim.max_handshakes_per_peer:
            return Arrival(refused=(
                f"refused: {lim.max_handshakes_per_peer} connections from {peer} are still in "
                f"the handshake (limit max_handshakes_per_peer={lim.max_handshakes_per_peer})"))
        evicted = why = None
        if len(self._handshaking) >= lim.max_handshakes:
            evicted = next(iter(self._handshaking))
            why = (f"dropped: {lim.max_handshakes} connections were in the handshake (limit "
                   f"max_handshakes={lim.max_handshakes}); the oldest makes room")
            self.leave(evicted)
        self._handshaking[key] = peer
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        return Arrival(evicted=evicted, evicted_why=why)

    def authenticate(self, key: Hashable) -> str | None:
        """The connection finished the handshake: None if it may stay, else why not."""
        peer = self._handshaking.get(key)
        if peer is None:
            return "dropped: the handshake's slot was given to a newer connection"
        if len(self._authenticated) >= self.limits.max_connections:
            return (f"refused: the receiver holds {self.limits.max_connections} authenticated "
                    f"connections (limit max_connections={self.limits.max_connections})")
        self._forget_handshake(key, peer)
        self._authenticated.add(key)
        return None

    def leave(self, key: Hashable) -> None:
        """The connection closed (idempotent)."""
        self._authenticated.discard(key)
        peer = self._handshaking.get(key)
        if peer is not None:
            self._forget_handshake(key, peer)

    def counts(self) -> ConnectionCounts:
        return ConnectionCounts(len(self._authenticated), len(self._handshaking),
                                tuple(sorted(self._per_peer.items())))

    def _forget_handshake(self, key: Hashable, peer: str) -> None:
        del self._handshaking[key]
        if self._per_peer[peer] == 1:
            del self._per_peer[peer]
        else:
            self._per_peer[peer] -= 1
