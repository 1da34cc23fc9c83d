"""The OpenAI-compatible HTTP API with the real `openai` client: completions and chat,
streaming and not, models, health, metrics, and bad input with the right status."""
from __future__ import annotations

import openai
import pytest

from tests.gateway.support import MAX_MESSAGE_BYTES, http

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_models_lists_the_served_checkpoint(client, checkpoint):
    assert [m.id for m in client.models.list().data] == [checkpoint("llama", "float32").name]


def test_completion_matches_the_engine_and_its_stream(client, model, reference):
    prompt = list(range(40, 70))
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=16, **GREEDY)
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (30, 16)
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16 and whole.id.startswith("cmpl-")
    ids = client.completions.create(model=model, prompt=prompt, max_tokens=16, logprobs=1, temperature=0,
                                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert len(ids.choices[0].logprobs.token_logprobs) == 16
    assert ids.choices[0].logprobs.tokens == [f"token_id:{t}" for t in reference(prompt, 16)]


def test_chat_completion_streaming_and_not(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=10, **GREEDY)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=10, stream=True,
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_bad_requests_get_their_status_and_a_message(client, model, gateway):
    cases = [
        (openai.BadRequestError, "the prompt is empty",
         lambda: client.completions.create(model=model, prompt="", max_tokens=4)),
        (openai.BadRequestError, "temperature must be a number >= 0",
         lambda: client.completions.create(model=model, prompt="hi", temperature=-1)),
        (openai.BadRequestError, "context is 256 tokens",
         lambda: client.completions.create(model=model, prompt=[5] * 300)),
        (openai.BadRequestError, "n must be between 1 and 128",
         lambda: client.completions.create(model=model, prompt="hi", n=129)),
        (openai.BadRequestError, "messages[0].role must be one of",
         lambda: client.chat.completions.create(model=model, messages=[{"role": "robot", "content": "x"}])),
        (openai.NotFoundError, "model 'gpt-9' is not served here",
         lambda: client.completions.create(model="gpt-9", prompt="hi")),
        (openai.NotFoundError, "unknown scenario 'nope'",
         lambda: client.completions.create(model=model, prompt="hi", extra_body={"scenario": "nope"})),
        (openai.APIStatusError, "the body is over the limit",
         lambda: client.completions.create(model=model, prompt="x" * MAX_MESSAGE_BYTES)),
    ]
    for error, message, call in cases:
        with pytest.raises(error) as info:
            call()
        assert message in info.value.message, info.value.message
    assert info.value.status_code == 413
    with openai.OpenAI(base_url=gateway.http_url + "/v1", api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError, match="wrong API key"):
            stranger.models.list()


def test_malformed_json_missing_key_and_open_endpoints(gateway, client, model):
    status, body = http(gateway, "/v1/completions", b"{not json")
    assert status == 400 and b"not valid JSON" in body
    status, body = http(gateway, "/v1/completions", b'{"prompt": "hi"}', key=None)
    assert status == 401 and b"missing API key" in body
    assert http(gateway, "/health", key=None) == (200, b'{"status": "ok"}')
    client.completions.create(model=model, prompt="metrics", max_tokens=2)
    status, body = http(gateway, "/metrics", key=None)
    text = body.decode()
    for name in ("pdmesh:requests_total", "pdmesh:time_to_first_token_seconds_bucket",
                 "pdmesh:e2e_request_latency_seconds_count", "pdmesh:kv_transfer_bytes_total", "pdmesh:kv_blocks",
                 "pdmesh:num_requests_waiting", "pdmesh:actors"):
        assert name in text, name
    assert f'pdmesh:actors{{model_name="{model}",role="prefill",scenario="default",state="serving"}} 1.0' in text
    assert any(line.startswith("pdmesh:kv_transfer_bytes_total{") and 'path="direct"' in line
               for line in text.splitlines())
