"""OpenTelemetry in every mesh process: one tracer provider configured by the standard OTEL_*
environment variables, and the W3C trace context carried across Ray calls as a plain dict.

Spans inside streaming actor methods are started and ended by hand (never made current):
a context attached in an async generator would be detached in another context.
"""
from __future__ import annotations

import os

from opentelemetry import propagate, trace
from opentelemetry.trace import Span

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_provider = None


def configure(service_name: str, env: dict[str, str] | None = None) -> bool:
    """Exports spans over OTLP when the environment names an endpoint (after applying `env`,
    the driver's OTEL_* settings handed to a Ray actor). Returns whether spans are exported."""
    global _provider
    if env:
        os.environ.update(env)
    if _provider is not None:
        return True
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true" or not any(map(os.environ.get, _ENDPOINT_VARS)):
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME, when set, names the process; else the role it plays
    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint, headers, TLS from env
    trace.set_tracer_provider(_provider)
    return True


def otel_env() -> dict[str, str]:
    """This process's OTEL_* settings, for the actors it starts (their service name is their own)."""
    return {k: v for k, v in os.environ.items() if k.startswith("OTEL_") and k != "OTEL_SERVICE_NAME"}


def flush() -> None:
    if _provider is not None:
        _provider.force_flush(5_000)


def shutdown() -> None:
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def start_span(name: str, carrier: dict | None, attributes: dict | None = None,
               kind: trace.SpanKind = trace.SpanKind.INTERNAL) -> Span:
    """A span whose parent is the context in `carrier` (a new trace when there is none)."""
    parent = propagate.extract(carrier) if carrier else None
    return trace.get_tracer("pdmesh").start_span(name, context=parent, attributes=attributes, kind=kind)


def carrier_of(span: Span) -> dict:
    """The W3C headers (traceparent, tracestate) that make `span` the parent on the other side."""
    carrier: dict = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def end(span: Span, error: BaseException | None = None) -> None:
    """Ends the span, marking it failed with the error's text when there is one."""
    if error is not None:
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(error) or type(error).__name__))
    span.end()
