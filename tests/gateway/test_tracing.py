"""One trace per request, received by an in-test OTLP receiver: the client's trace id kept, and
the chain client -> gateway -> prefill -> kv_transfer -> decode intact across processes."""
from __future__ import annotations

import time

import grpc

from gateway.proto import inference_pb2 as pb
from gateway.proto import inference_pb2_grpc
from tests.gateway.support import API_KEY

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def wait_for_spans(otlp, names: set[str], bound_s: float = 60.0) -> dict:
    """The trace's spans by name, once every name arrived (actors export in batches)."""
    end = time.monotonic() + bound_s
    while True:
        spans = {s.name: (service, s) for service, s in otlp.of_trace(bytes.fromhex(TRACE_ID))}
        if names <= spans.keys() or time.monotonic() > end:
            return spans
        time.sleep(0.1)


def test_request_trace_from_client_through_every_phase(gateway, otlp):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(gateway.grpc_address))
    metadata = (("authorization", f"Bearer {API_KEY}"), ("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"))
    list(stub.Generate(pb.GenerateRequest(text="trace me", sampling=pb.SamplingOptions(max_tokens=6,
                                                                                        ignore_eos=True)),
                       metadata=metadata, timeout=60))
    spans = wait_for_spans(otlp, {"gateway.generate", "classify", "prefill", "kv_transfer", "decode"})
    assert {"gateway.generate", "classify", "prefill", "kv_transfer", "decode"} <= spans.keys(), sorted(spans)
    parent = {name: s.parent_span_id.hex() for name, (_, s) in spans.items()}
    span_id = {name: s.span_id.hex() for name, (_, s) in spans.items()}
    assert parent["gateway.generate"] == CLIENT_SPAN
    assert parent["classify"] == span_id["gateway.generate"]
    assert parent["prefill"] == span_id["gateway.generate"]
    assert parent["kv_transfer"] == span_id["prefill"]
    assert parent["decode"] == span_id["kv_transfer"]
    assert spans["gateway.generate"][0] == "pdmesh-gateway" and spans["decode"][0] == "pdmesh-actor"
    transfer = {a.key: a.value for a in spans["kv_transfer"][1].attributes}
    assert transfer["kv.bytes"].int_value > 0 and transfer["kv.backend"].string_value
    events = [e.name for e in spans["gateway.generate"][1].events]
    assert "prefill_accepted" in events and "kv_transfer" in events
