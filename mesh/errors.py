"""Typed errors that cross actor boundaries; `code` maps to a gRPC status in the gateway."""
from __future__ import annotations

CODES = ("invalid_argument", "resource_exhausted", "unavailable", "deadline_exceeded", "cancelled",
         "internal")


class MeshError(Exception):
    """One request failed; the actor that raised it serves on."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        assert code in CODES, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # Ray carries exceptions by value; keep the fields
        return (MeshError, (self.code, self.message, self.retry_after_s))


class RequestMoved(MeshError):
    """The actor gave a request back unfinished (a drain or flip ran out of time): the
    dispatcher re-runs it elsewhere from the prompt plus the tokens already sent, and
    does not count the actor as lost. Reaches a client only when no attempt is left."""

    def __init__(self, message: str):
        super().__init__("unavailable", message)

    def __reduce__(self):
        return (RequestMoved, (self.message,))
