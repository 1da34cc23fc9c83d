"""One gateway process: the scenarios' pools on Ray, the gRPC and HTTP front ends over one
InferenceService, the actors' load refreshed and the ratio controller run in the background,
and an orderly shutdown."""
from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from gateway import http_server, telemetry
from gateway.admin import AdminServicer
from gateway.auth import Keys
from gateway.config import ServeConfig
from gateway.control import ControlLoop
from gateway.fleet import Fleet
from gateway.grpc_api import make_server, set_health
from gateway.metrics import Metrics
from gateway.openai_api import OpenAIApi
from gateway.service import InferenceService
from mesh import tracing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    grpc_port: int = 50051  # 0: any free port
    http_port: int = 8000
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    access_log: bool = False  # one line per HTTP request


class Gateway:
    def __init__(self, config: ServeConfig, keys: Keys, listen: Listen = Listen(), refresh_s: float = 1.0):
        self.config, self.keys, self.listen, self.refresh_s = config, keys, listen, refresh_s
        self.fleet = Fleet(config, transport_secret=secrets.token_hex(16))  # actors' KV channels, this run only
        self.metrics = Metrics(self.fleet.actor_infos, config.scenarios, config.served_name)
        self.service = InferenceService(self.fleet, config.gateway, self.metrics)
        self.control = ControlLoop(self.fleet, self.service.load, self.metrics, config.controller)
        self.grpc_port = self.http_port = 0
        self._tasks: list[asyncio.Task] = []
        self._problems: list[str] = []  # why some scenario cannot serve, as last logged

    async def start(self) -> None:
        """Listens at once (health says NOT_SERVING / 503 until every pool has serving actors),
        then starts the actors."""
        telemetry.configure()
        limits = self.config.gateway
        self.grpc, self.health = make_server(self.service, AdminServicer(self.fleet, self.control, self.keys),
                                             self.keys, limits)
        address = f"{self.listen.host}:{self.listen.grpc_port}"
        tls = self._tls()
        self.grpc_port = (self.grpc.add_secure_port(address, grpc.ssl_server_credentials([tls]))
                          if tls else self.grpc.add_insecure_port(address))
        await set_health(self.health, False)
        await self.grpc.start()
        api = OpenAIApi(self.service, self.keys, self.metrics, self.fleet.not_ready, limits)
        self.http = await http_server.start(api.app, self.listen.host, self.listen.http_port, self._ssl_context(tls),
                                            limits, self.listen.access_log)
        self.http_port = self.http.addresses[0][1]
        await self.fleet.start(on_change=self._health_changed)
        await self.fleet.refresh()
        await self._set_health()
        self._tasks = [asyncio.create_task(self._refresh()), asyncio.create_task(self.control.run())]

    @property
    def addresses(self) -> dict[str, str]:
        scheme = "https" if self.listen.tls_cert else "http"
        return {"grpc": f"{self.listen.host}:{self.grpc_port}",
                "http": f"{scheme}://{self.listen.host}:{self.http_port}"}

    async def _refresh(self) -> None:
        """The actors' load for the router's offer order, readiness and the gauges; a missed
        report tells the supervisor."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.fleet.refresh()
                await self._set_health()
            except Exception:  # one failed round; the next one tries again
                log.exception("refreshing the actors' load failed")

    async def _set_health(self) -> None:
        """NOT_SERVING (and /health 503, with the reasons) only while some scenario cannot serve at all."""
        problems = self.fleet.not_ready()
        if problems != self._problems:
            log.log(logging.WARNING if problems else logging.INFO, "health: %s",
                    "; ".join(problems) or "every scenario serves")
            self._problems = problems
        await set_health(self.health, not problems and not self.service.closing)

    def _health_changed(self) -> None:
        """An actor died or a replacement serves: the gRPC health answer follows at once."""
        self._tasks.append(asyncio.create_task(self._set_health()))
        self._tasks = [t for t in self._tasks if not t.done()]

    async def stop(self, grace_s: float = 10.0) -> None:
        """New requests get UNAVAILABLE; those in flight get `grace_s` to finish, then end
        UNAVAILABLE (gRPC status, HTTP 503, or an SSE error event), whichever API they came by;
        then the front ends close and the actors stop."""
        self.service.closing = True
        for task in self._tasks:  # the controller first of all: no flip starts while the actors stop
            task.cancel()
        await set_health(self.health, False)
        await self.service.finish(grace_s)
        await asyncio.gather(self.grpc.stop(http_server.UNWIND_S), self.http.cleanup())
        self.service.tokenizing.close()
        await self.fleet.close()
        tracing.flush()  # the process's tracer provider outlives one gateway: `pdmesh serve` shuts it down

    def _tls(self) -> tuple[bytes, bytes] | None:
        cert, key = self.listen.tls_cert, self.listen.tls_key
        if bool(cert) != bool(key):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert, --tls-key)")
        return (Path(key).read_bytes(), Path(cert).read_bytes()) if cert else None

    def _ssl_context(self, tls: tuple[bytes, bytes] | None) -> ssl.SSLContext | None:
        if tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.listen.tls_cert, self.listen.tls_key)
        return context
