"""What the gateway answers when a request fails: one error type, and per code the gRPC
status, the HTTP status and the error `type` in OpenAI's words. Status names are strings so that the policies importing this
(gateway.router, reused by simtests/) load without grpc.

A failure of the gateway's own code or the mesh's internals reaches the client only as
`hidden`'s INTERNAL with an id: its text may name Ray actors, pids and node addresses, which
go to the gateway's log under that id. A mesh error meant for the client (no capacity, a
transfer that failed) keeps its message, less any node address or pid in it."""
from __future__ import annotations

import logging
import re

from mesh import MeshError

log = logging.getLogger(__name__)

# where the mesh runs, which is no client's business: IPv4 or [IPv6] addresses (with a port), pids
_WHERE = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\](?::\d+)?|\bpid=\d+")

# code -> (gRPC status name, HTTP status, OpenAI error type)
STATUSES = {
    "invalid_argument": ("INVALID_ARGUMENT", 400, "invalid_request_error"),
    "not_found": ("NOT_FOUND", 404, "invalid_request_error"),  # OpenAI's word for an unknown model or route
    "method_not_allowed": ("UNIMPLEMENTED", 405, "invalid_request_error"),
    "failed_precondition": ("FAILED_PRECONDITION", 409, "invalid_request_error"),
    "unauthenticated": ("UNAUTHENTICATED", 401, "authentication_error"),
    "permission_denied": ("PERMISSION_DENIED", 403, "permission_error"),
    "payload_too_large": ("RESOURCE_EXHAUSTED", 413, "invalid_request_error"),
    "request_timeout": ("DEADLINE_EXCEEDED", 408, "invalid_request_error"),  # the client sent its request too slowly
    "resource_exhausted": ("RESOURCE_EXHAUSTED", 429, "rate_limit_exceeded"),
    "unavailable": ("UNAVAILABLE", 503, "server_error"),
    "deadline_exceeded": ("DEADLINE_EXCEEDED", 504, "server_error"),
    "cancelled": ("CANCELLED", 499, "invalid_request_error"),
    "internal": ("INTERNAL", 500, "server_error"),
}


class GatewayError(Exception):
    def __init__(self, code: str, message: str, retry_after_s: float | None = None, param: str | None = None):
        """param: the request field at fault, when one is (OpenAI's error `param`)."""
        assert code in STATUSES, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param

    @classmethod
    def from_mesh(cls, e: MeshError) -> "GatewayError":
        return cls(e.code, _WHERE.sub("<internal>", e.message), e.retry_after_s)

    @property
    def grpc_status_name(self) -> str:
        return STATUSES[self.code][0]

    @property
    def http_status(self) -> int:
        return STATUSES[self.code][1]

    @property
    def openai_type(self) -> str:
        return STATUSES[self.code][2]


def hidden(e: BaseException, request_id: str) -> GatewayError:
    """An internal failure as the client sees it; the details are logged under request_id."""
    log.error("request %s failed inside the gateway or the mesh", request_id, exc_info=e)
    return GatewayError("internal", f"request {request_id} failed inside the gateway or the mesh; its log has the details "
                                    "under this request id")
