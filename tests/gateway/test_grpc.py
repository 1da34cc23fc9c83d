"""The gRPC API with the generated client: streaming Generate, health, reflection, and every
kind of bad request answered with its status and a message, none disturbing a request in flight."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.proto import inference_pb2 as pb
from gateway.proto import inference_pb2_grpc
from tests.gateway.support import AUTH, MAX_MESSAGE_BYTES, assert_no_blocks_held

GREEDY = pb.SamplingOptions(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def channel(gateway):
    with grpc.insecure_channel(gateway.grpc_address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return inference_pb2_grpc.InferenceStub(channel)


def sampling(max_tokens: int, **extra) -> pb.SamplingOptions:
    s = pb.SamplingOptions(max_tokens=max_tokens, **extra)
    s.MergeFrom(GREEDY)
    return s


def error_of(stub, request, metadata=AUTH, timeout=30) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, metadata=metadata, timeout=timeout))
    return info.value


def test_generate_streams_the_engines_greedy_tokens(stub, reference):
    prompt = list(range(30, 61))
    replies = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling(20),
                                                    request_id="grpc-same"), metadata=AUTH, timeout=60))
    assert [t for r in replies for t in r.token_ids] == reference(prompt, 20)
    assert replies[0].request_id == "grpc-same" and replies[0].scenario == "default"
    assert all(not r.finish_reason for r in replies[:-1]) and replies[-1].finish_reason == "length"
    assert (replies[-1].usage.prompt_tokens, replies[-1].usage.completion_tokens) == (31, 20)


def test_text_prompt_streams_text_deltas_with_logprobs(stub):
    replies = list(stub.Generate(pb.GenerateRequest(text="The quick brown fox", sampling=sampling(12, logprobs=True)),
                                 metadata=AUTH, timeout=60))
    tokens = [t for r in replies for t in r.token_ids]
    assert len(tokens) == 12 and len([lp for r in replies for lp in r.logprobs]) == 12
    assert "".join(r.text for r in replies)
    assert replies[0].request_id  # made by the gateway


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "pdmesh.v1.Inference"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert {"pdmesh.v1.Inference", "pdmesh.v1.Admin", "grpc.health.v1.Health"} <= names


BAD = [
    ("missing key", pb.GenerateRequest(text="hi"), (), grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
    ("wrong key", pb.GenerateRequest(text="hi"), (("authorization", "Bearer nope"),),
     grpc.StatusCode.UNAUTHENTICATED, "wrong API key"),
    ("empty prompt", pb.GenerateRequest(text=""), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty"),
    ("no prompt", pb.GenerateRequest(), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty"),
    ("over-long prompt", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 300)), AUTH,
     grpc.StatusCode.INVALID_ARGUMENT, "context is 256 tokens"),
    ("prompt plus output over the context", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 250),
                                                                sampling=pb.SamplingOptions(max_tokens=10)),
     AUTH, grpc.StatusCode.INVALID_ARGUMENT, "lower max_tokens to 6"),
    ("token id outside the vocabulary", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10 ** 9])), AUTH,
     grpc.StatusCode.INVALID_ARGUMENT, "prompt token ids must be in"),
    ("unknown scenario", pb.GenerateRequest(text="hi", scenario="nope"), AUTH, grpc.StatusCode.NOT_FOUND,
     "unknown scenario 'nope'; this gateway serves: default"),
    ("unknown model", pb.GenerateRequest(text="hi", model="gpt-9"), AUTH, grpc.StatusCode.NOT_FOUND,
     "model 'gpt-9' is not served here"),
    ("top_p above 1", pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(top_p=2)), AUTH,
     grpc.StatusCode.INVALID_ARGUMENT, "top_p must be a number in (0, 1]"),
    ("max_tokens 0", pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=0)), AUTH,
     grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be a positive integer"),
    ("min_tokens over max_tokens", pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=2,
                                                                                           min_tokens=5)),
     AUTH, grpc.StatusCode.INVALID_ARGUMENT, "min_tokens must be between 0 and max_tokens"),
    ("over-size message", pb.GenerateRequest(text="x" * (MAX_MESSAGE_BYTES + 10)), AUTH,
     grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
]


def test_bad_requests_get_their_status_and_leave_a_request_in_flight_alone(stub, reference):
    prompt = list(range(3, 20))
    in_flight = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling(60)),
                              metadata=AUTH, timeout=120)
    first = next(in_flight)
    for name, request, metadata, code, message in BAD:
        e = error_of(stub, request, metadata)
        assert (e.code(), message in e.details()) == (code, True), (name, e.code(), e.details())
    tokens = list(first.token_ids) + [t for r in in_flight for t in r.token_ids]
    assert tokens == reference(prompt, 60)


def test_client_deadline_ends_the_request_and_frees_its_kv(stub, gateway):
    e = error_of(stub, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[9] * 20), sampling=sampling(230)),
                 timeout=0.2)
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_no_blocks_held(gateway)


def test_cancelled_stream_frees_its_kv_everywhere(stub, gateway):
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[11] * 24), sampling=sampling(200)),
                         metadata=AUTH, timeout=120)
    next(call)
    call.cancel()
    assert_no_blocks_held(gateway)
