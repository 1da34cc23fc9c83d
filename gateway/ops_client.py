"""The ops CLI's side of the admin API: a channel to the gateway with the admin key, and every
failure turned into one message and an exit code that scripts can tell apart."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc

from gateway.proto import admin_pb2_grpc

# exit codes; click's own usage errors exit with 2 too
FAILED = 1  # the gateway could not do it (an actor refused, the last of its role, ...)
BAD_INPUT = 2  # unknown scenario or actor, a ratio outside the limits, a malformed value
AUTH = 3  # the admin key is missing or wrong
UNREACHABLE = 4  # no gateway answers at the address

WARNING_KEY = "pdmesh-warning"  # trailing metadata of a forced operation: what it overrode

_BAD_INPUT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}


class OpsError(Exception):
    def __init__(self, message: str, exit_code: int, status: str = ""):
        super().__init__(message)
        self.message, self.exit_code, self.status = message, exit_code, status


@dataclass(frozen=True)
class Target:
    address: str
    admin_key: str | None
    tls_ca: str | None = None  # a PEM file: TLS, trusting this CA
    tls: bool = False  # TLS with the system's roots
    timeout_s: float = 120.0  # per call: flips and drains wait for in-flight requests


class AdminClient:
    """The Admin stub's calls, each returning its reply or raising OpsError; `warn` gets what a
    forced operation overrode."""

    def __init__(self, target: Target, warn: Callable[[str], None] = lambda warning: None):
        self.target, self.warn = target, warn
        if target.tls or target.tls_ca:
            root = Path(target.tls_ca).read_bytes() if target.tls_ca else None
            self.channel = grpc.secure_channel(target.address, grpc.ssl_channel_credentials(root))
        else:
            self.channel = grpc.insecure_channel(target.address)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)
        self._connected = False

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()

    def call(self, method: str, request):
        self._connect()
        metadata = (("authorization", f"Bearer {self.target.admin_key}"),) if self.target.admin_key else ()
        try:
            reply, call = getattr(self.stub, method).with_call(request, metadata=metadata,
                                                               timeout=self.target.timeout_s)
        except grpc.RpcError as e:
            raise _translate(e, self.target) from None
        for key, value in call.trailing_metadata() or ():
            if key == WARNING_KEY:
                self.warn(value)
        return reply

    def _connect(self) -> None:
        """Tells 'nobody answers' apart from the gateway's own UNAVAILABLE answers."""
        if self._connected:
            return
        timeout_s = min(5.0, self.target.timeout_s)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise OpsError(f"cannot reach the gateway at {self.target.address} (no answer in {timeout_s:g} s): "
                           f"is `pdmesh serve` running there? (--address, PDMESH_ADDRESS)", UNREACHABLE,
                           "UNAVAILABLE") from None
        self._connected = True


def _translate(e: grpc.RpcError, target: Target) -> OpsError:
    code, details = e.code(), e.details() or ""
    if code is grpc.StatusCode.PERMISSION_DENIED:  # its message says what to do
        return OpsError(f"the gateway refused: {details}", AUTH, code.name)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        hint = ("pass the gateway's admin key with --admin-key, --admin-key-file or PDMESH_ADMIN_KEY (on the "
                "gateway's host, `pdmesh serve` writes a local credential that is used when none is given)")
        return OpsError(f"the gateway refused the admin key: {details} ({hint})", AUTH, code.name)
    if code in _BAD_INPUT:
        return OpsError(details, BAD_INPUT, code.name)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return OpsError(f"no answer from {target.address} within {target.timeout_s:.0f} s (--timeout): {details}",
                        FAILED, code.name)
    return OpsError(details or code.name, FAILED, code.name)
