"""Tracing at the gateway: the OTLP set-up (shared with the actors, mesh.tracing), the client's
W3C context from gRPC metadata or HTTP headers, and the dispatcher's events as span events."""
from __future__ import annotations

from typing import Iterable

from opentelemetry import propagate, trace

from mesh import Event, tracing

TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


def configure() -> bool:
    """Spans go over OTLP where the OTEL_* environment says; returns whether they are exported."""
    return tracing.configure("pdmesh-gateway")


def client_context(pairs: Iterable[tuple[str, str]]):
    """The parent context a client sent (gRPC metadata or HTTP headers); None when it sent none."""
    carrier = {k.lower(): v for k, v in pairs if k.lower() in TRACE_HEADERS}
    return propagate.extract(carrier) if carrier else None


def _attribute(value):
    return value if isinstance(value, (str, bool, int, float)) else str(value)


class SpanEvents(list):
    """The dispatcher's event list; each event also lands on the request's span as it happens
    (offers, rejections with their reasons, retries, the KV transfer's figures)."""

    def __init__(self, span: trace.Span):
        super().__init__()
        self.span = span

    def append(self, event: Event) -> None:
        super().append(event)
        self.span.add_event(event.name, {k: _attribute(v) for k, v in event.attributes.items() if v is not None})
