"""An OTLP trace receiver (gRPC) that keeps every span it is sent, in memory: the tests' view of
what the gateway and its actors export."""
from __future__ import annotations

import threading

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects the spans every process exports (OTLP over gRPC)."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list:
        with self.lock:
            return [(service, s) for service, s in self.spans if s.trace_id == trace_id]
