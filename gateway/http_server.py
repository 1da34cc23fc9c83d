"""The HTTP server under the OpenAI API: aiohttp's runner, bounded against slow and idle clients.

- A connection that has not sent a whole request head within `idle_timeout_s` of opening, or
  of its last response, is closed: aiohttp's keep-alive timer runs from the connection's start
  and until a request's head has arrived, so one timer bounds slow-loris header trickles and
  idle keep-alive connections alike. (A body is bounded by `body_timeout_s` in the API.)
- Past `max_connections` open connections, a new one is answered 503 and closed at once.
- On stop, handlers get UNWIND_S to finish; the gateway has ended its requests by then.
- What is not HTTP/1 at all (a gRPC client, TLS on the plain port) is answered 400 by aiohttp
  and logged as one WARNING line, not aiohttp's ERROR traceback.
- With `access_log`, one line per request (logger aiohttp.access, gateway.logs.ACCESS)."""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.config import Limits
from gateway.errors import GatewayError
from gateway.logs import ACCESS
from gateway.openai_api import error_body

UNWIND_S = 2.0  # after the grace period: how long the front ends give the requests it ended to say so


class _BoundedRunner(web.AppRunner):
    """An AppRunner whose sites take at most `max_connections` connections."""
    __slots__ = ("_max_connections",)

    def __init__(self, app: web.Application, max_connections: int, **kwargs):
        super().__init__(app, **kwargs)
        self._max_connections = max_connections

    @property
    def connections(self) -> int:
        return len(super().server.connections)

    @property
    def server(self):  # what a site listens with: the protocol factory
        server = super().server
        return None if server is None else _ConnectionLimit(server, self._max_connections)


class _ConnectionLimit:
    def __init__(self, server: web.Server, limit: int):
        self.server, self.limit = server, limit

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) >= self.limit:
            return _Refusal(self.limit)
        return self.server()


class _Refusal(asyncio.Protocol):
    """Answers 503 in OpenAI's error body and closes."""

    def __init__(self, limit: int):
        error = GatewayError("unavailable", f"the gateway has its maximum of {limit} connections open "
                                            "(gateway.max_connections); retry later")
        body = json.dumps(error_body(error)).encode()
        self.reply = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nX-Request-Id: {uuid.uuid4().hex}\r\n"
                      "Connection: close\r\n\r\n").encode() + body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.reply)
        transport.close()


class _ServerLog(logging.LoggerAdapter):
    """aiohttp's server log, with a request that is not HTTP/1 as one line."""

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        if isinstance(exc_info, HttpProcessingError):
            what = (exc_info.message or "").strip().split("\n", 1)[0].rstrip(":")
            self.warning(msg + ": not an HTTP/1 request (%s), answered %s; a gRPC or TLS client on the HTTP port?",
                         *args, what, exc_info.code)
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)


async def start(app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None,
                limits: Limits, access_log: bool = False) -> web.AppRunner:
    """Serves `app` at host:port (0: any free port); the runner's `addresses` says where."""
    runner = _BoundedRunner(app, limits.max_connections, handler_cancellation=True,
                            access_log=logging.getLogger("aiohttp.access") if access_log else None,
                            access_log_format=ACCESS, logger=_ServerLog(logging.getLogger("aiohttp.server"), {}),
                            shutdown_timeout=UNWIND_S, keepalive_timeout=limits.idle_timeout_s)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    return runner
