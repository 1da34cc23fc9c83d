"""Poison requests through the real gateway: sampling values that would break a step are refused
with 400 / INVALID_ARGUMENT naming the field, and a request whose engine step fails (a fault
injection point on the decode actor) fails alone, while innocent requests sent at the same
time are all served in full with the tokens one engine alone gives."""
from __future__ import annotations

import asyncio

import grpc
import openai
import pytest

from gateway.proto import inference_pb2 as pb
from gateway.proto import inference_pb2_grpc
from tests.gateway.support import API_KEY, AUTH, ENGINE, MAX_MESSAGE_BYTES, assert_no_blocks_held, serving, tiny_config

FAULTY = {"faulty-decode": 2, "faulty-prefill": 0}  # request id -> its steps raise once it has this many tokens


@pytest.fixture(scope="module")
def poisoned(checkpoint, ray_cluster):
    """A 1 prefill + 1 decode gateway whose engines fail the steps of the FAULTY requests: one on
    the decode actor, one on the prefill actor."""
    from gateway.config import Limits

    config = tiny_config(checkpoint, Limits(max_message_bytes=MAX_MESSAGE_BYTES, admission_timeout_s=5.0),
                         fail_steps=FAULTY)
    with serving(config) as running:
        yield running


@pytest.fixture(scope="module")
def vocab(poisoned) -> int:
    (scenario,) = poisoned.gateway.fleet.scenarios.values()
    return scenario.tokenizer.vocab_size


@pytest.fixture(scope="module")
def model(poisoned):
    with openai.OpenAI(base_url=poisoned.http_url + "/v1", api_key=API_KEY, max_retries=0) as c:
        return c.models.list().data[0].id


def poisons(vocab: int) -> list[tuple[dict, str]]:
    """(body fields, what the 400's message must say) per poison value."""
    return [
        ({"temperature": 1e-300}, "temperature must be a number >= 0: 0 (greedy) or a finite number >= 0.01"),
        ({"seed": 2**64}, "seed must be an integer in [0, 2**63)"),
        ({"seed": -1}, "seed must be an integer in [0, 2**63)"),
        ({"stop_token_ids": [vocab], "min_tokens": 2}, f"stop_token_ids must be in [0, {vocab})"),
        ({"stop_token_ids": [2**64], "min_tokens": 2}, f"stop_token_ids must be in [0, {vocab})"),
        ({"stop_token_ids": list(range(vocab)), "min_tokens": 2}, "ban every token until min_tokens"),
    ]


def test_each_poison_value_gets_400_naming_the_field_over_http(poisoned, model, vocab):
    with openai.OpenAI(base_url=poisoned.http_url + "/v1", api_key=API_KEY, max_retries=0, timeout=30) as client:
        for fields, message in poisons(vocab):
            for call in (lambda: client.completions.create(model=model, prompt="Hello", max_tokens=4,
                                                           extra_body=fields),
                         lambda: client.chat.completions.create(model=model, max_tokens=4, extra_body=fields,
                                                                messages=[{"role": "user", "content": "Hi"}])):
                with pytest.raises(openai.BadRequestError) as info:
                    call()
                assert message in info.value.message, (fields, info.value.message)


def test_each_poison_value_gets_invalid_argument_over_grpc(poisoned, vocab):
    # The proto's types hold no seed >= 2**63 and no stop id >= 2**32: the largest ones it can carry.
    cases = [(pb.SamplingOptions(temperature=1e-300), "temperature must be a number >= 0: 0 (greedy)"),
             (pb.SamplingOptions(seed=-1), "seed must be an integer in [0, 2**63)"),
             (pb.SamplingOptions(stop_token_ids=[vocab], min_tokens=2), f"stop_token_ids must be in [0, {vocab})"),
             (pb.SamplingOptions(stop_token_ids=[2**32 - 1], min_tokens=2), "stop_token_ids must be in"),
             (pb.SamplingOptions(stop_token_ids=range(vocab), min_tokens=2), "ban every token until min_tokens")]
    with grpc.insecure_channel(poisoned.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for options, message in cases:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(pb.GenerateRequest(text="Hello", sampling=options), metadata=AUTH, timeout=30))
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()


def test_innocent_requests_are_served_in_full_among_poison_ones(poisoned, model, vocab, checkpoint, caplog):
    from mesh.engine.config import EngineConfig
    from mesh.engine.engine import Engine
    from mesh.engine.sampling_params import SamplingParams

    innocents = [({"prompt": list(range(20 + i, 30 + 2 * i)), "max_tokens": 8, "temperature": 0.8 if i % 2 else 0,
                   "seed": i}, f"innocent-{i}") for i in range(8)]
    engine = Engine(EngineConfig(model=str(checkpoint("llama", "float32")), **ENGINE))
    expected = {rid: engine.generate([body["prompt"]], SamplingParams(
        max_tokens=8, temperature=body["temperature"], seed=body["seed"], ignore_eos=True))[0].token_ids
        for body, rid in innocents}

    async def send(client, body: dict, rid: str):
        extra = {"ignore_eos": True, "request_id": rid, "return_tokens_as_token_ids": True, **body.pop("extra", {})}
        return await client.completions.create(model=model, logprobs=1, extra_body=extra, **body)

    async def main():
        async with openai.AsyncOpenAI(base_url=poisoned.http_url + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=60) as client:
            bad = [({"prompt": "Hello", "max_tokens": 8, "extra": fields}, f"poison-{i}")
                   for i, (fields, _) in enumerate(poisons(vocab))]
            faulty = [({"prompt": list(range(40, 52)), "max_tokens": 8, "temperature": 0}, rid) for rid in FAULTY]
            others = bad + faulty
            requests = [r for i, innocent in enumerate(innocents) for r in [innocent, *others[i:i + 1]]]
            return dict(zip([rid for _, rid in requests], await asyncio.gather(
                *(send(client, dict(body), rid) for body, rid in requests), return_exceptions=True)))

    results = asyncio.run(main())
    for _, rid in innocents:
        assert not isinstance(results[rid], Exception), (rid, results[rid])
        choice = results[rid].choices[0]
        tokens = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
        assert tokens == expected[rid] and choice.finish_reason == "length", rid
    for rid, result in results.items():
        if rid.startswith("poison-"):
            assert isinstance(result, openai.BadRequestError), (rid, result)
    for rid in FAULTY:
        assert isinstance(results[rid], openai.InternalServerError), results[rid]
        # the client learns which request failed; where and why go to the gateway's log only
        assert f"request {rid} failed inside the gateway or the mesh" in results[rid].message
        assert "fault injected" not in results[rid].message
        assert any(f"request {rid} failed in the engine" in str(r.exc_info[1]) and "fault injected" in
                   str(r.exc_info[1]) for r in caplog.records if r.exc_info), rid
    assert_no_blocks_held(poisoned)
