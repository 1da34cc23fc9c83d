"""The OpenAI API says what it does: fields it cannot honour are refused naming the field,
logprobs carry token text and the top alternatives asked for, `n` choices come back indexed
(streamed and not), errors use OpenAI's `type` words, every response has X-Request-Id, and a
wrong method gets 405 with Allow. Through the real `openai` client where it can say it."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from gateway.errors import STATUSES, GatewayError
from gateway.openai_api import error_body
from tests.gateway.conftest import API_KEY

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "user", "content": "Say hello."}]


def http(gateway, path: str, body: dict | None = None, headers: dict | None = None, method: str | None = None):
    """(status, headers, body) of one raw HTTP call with the test key."""
    request = urllib.request.Request(gateway.http_url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {API_KEY}", **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.mark.parametrize("path,fields,param", [
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_fields_it_cannot_honour_are_refused_naming_the_field(gateway, path, fields, param):
    base = {"messages": MESSAGES} if "chat" in path else {"prompt": "hi"}
    status, _, reply = http(gateway, path, {**base, "max_tokens": 2, **fields})
    error = json.loads(reply)["error"]
    assert (status, error["type"], error["param"]) == (400, "invalid_request_error", param), error
    assert error["message"].startswith(param) and "Value error" not in error["message"], error


def test_the_harmless_forms_are_accepted(client, model):
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, response_format={"type": "text"},
                                           tool_choice="none", **GREEDY)
    assert reply.usage.completion_tokens == 2


def test_completion_logprobs_are_token_text_with_the_top_alternatives(client, model, gateway):
    prompt = list(range(40, 60))
    (scenario,) = gateway.gateway.fleet.scenarios.values()
    text = client.completions.create(model=model, prompt=prompt, max_tokens=8, logprobs=3, **GREEDY).choices[0]
    ids = client.completions.create(model=model, prompt=prompt, max_tokens=8, logprobs=3, temperature=0,
                                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}).choices[0]
    ids = [int(t.removeprefix("token_id:")) for t in ids.logprobs.tokens]
    lp = text.logprobs
    assert lp.tokens == [scenario.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(8)]
    # three alternatives a token; tokens whose texts coincide share one key
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs) and any(len(top) == 3 for top in lp.top_logprobs)
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # greedy: the chosen token is the most likely one
        assert max(top.values()) == pytest.approx(chosen) and top[token] == pytest.approx(chosen)
        assert list(top.values()) == sorted(top.values(), reverse=True)
    assert client.completions.create(model=model, prompt=prompt, max_tokens=2, logprobs=0,
                                     **GREEDY).choices[0].logprobs.top_logprobs is None


def test_chat_logprobs_streamed_and_not(client, model):
    asked = {"logprobs": True, "top_logprobs": 2, "max_tokens": 6}
    whole = client.chat.completions.create(model=model, messages=MESSAGES, **asked, **GREEDY).choices[0]
    content = whole.logprobs.content
    assert "".join(c.token for c in content) == whole.message.content
    for c in content:
        assert c.bytes == list(c.token.encode("utf-8", errors="replace"))
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **asked, **GREEDY))
    streamed = [c for chunk in chunks for choice in chunk.choices if choice.logprobs for c in choice.logprobs.content]
    assert [(c.token, [t.token for t in c.top_logprobs]) for c in streamed] == [
        (c.token, [t.token for t in c.top_logprobs]) for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)


def test_n_choices_are_the_seeded_requests_one_by_one(client, model):
    sampled = {"model": model, "prompt": "Once upon", "max_tokens": 6, "temperature": 1.0, "seed": 7,
               "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(n=3, **sampled)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    alone = [client.completions.create(**{**sampled, "seed": 7 + i}).choices[0].text for i in range(3)]
    assert [c.text for c in whole.choices] == alone
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        client.completions.create(**sampled).usage.prompt_tokens, 18)
    chunks = list(client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **sampled))
    texts, finished = ["", "", ""], [None, None, None]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finished[choice.index] = choice.finish_reason or finished[choice.index]
    assert texts == alone and finished == ["length"] * 3
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 18


def test_n_chat_choices_stream_with_their_own_roles(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, n=2, stream=True,
                                                 temperature=0.9, seed=1, extra_body={"ignore_eos": True}))
    roles = [(choice.index, choice.delta.role) for chunk in chunks for choice in chunk.choices if choice.delta.role]
    assert roles == [(0, "assistant"), (1, "assistant")]
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, n=2, temperature=0.9,
                                           seed=1, extra_body={"ignore_eos": True})
    for i in range(2):
        streamed = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices if c.index == i)
        assert streamed == whole.choices[i].message.content


def test_error_types_are_openais_words(gateway):
    words = {code: error_body(GatewayError(code, "x"))["error"]["type"] for code in STATUSES}
    assert words["invalid_argument"] == words["not_found"] == "invalid_request_error"
    assert (words["unauthenticated"], words["resource_exhausted"], words["internal"], words["unavailable"]) == (
        "authentication_error", "rate_limit_exceeded", "server_error", "server_error")
    status, _, reply = http(gateway, "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert (status, json.loads(reply)["error"]["type"]) == (401, "authentication_error")
    status, _, reply = http(gateway, "/v1/completions", {"prompt": "hi", "model": "gpt-9"})
    assert (status, json.loads(reply)["error"]["type"]) == (404, "invalid_request_error")
    status, _, reply = http(gateway, "/v1/completions", {"prompt": "hi", "temperature": "hot"})
    error = json.loads(reply)["error"]
    assert (status, error["param"]) == (400, "temperature") and error["message"].startswith("temperature: ")


def test_every_response_has_x_request_id(gateway):
    calls = [("/v1/completions", {"prompt": "hi", "max_tokens": 2}, None), ("/v1/nope", None, None),
             ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}, None),
             ("/v1/completions", {"prompt": "", "max_tokens": 2}, None), ("/health", None, None),
             ("/v1/completions", None, "GET")]
    for path, body, method in calls:
        _, headers, _ = http(gateway, path, body, {"X-Request-Id": "client-id-1"}, method)
        assert headers["X-Request-Id"] == "client-id-1", path
        _, headers, _ = http(gateway, path, body, method=method)
        assert len(headers["X-Request-Id"]) == 32, path
    _, headers, reply = http(gateway, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "request_id": "mine-1"})
    assert headers["X-Request-Id"] == "mine-1" and json.loads(reply)["id"] == "cmpl-mine-1"


def test_a_wrong_method_gets_405_with_allow(gateway, client):
    status, headers, reply = http(gateway, "/v1/chat/completions", method="GET")
    assert (status, headers["Allow"]) == (405, "POST")
    assert json.loads(reply)["error"]["type"] == "invalid_request_error"
    status, headers, _ = http(gateway, "/v1/models", {"x": 1}, method="POST")
    assert status == 405 and "GET" in headers["Allow"]
    with pytest.raises(openai.APIStatusError) as info:
        client.get("/completions", cast_to=object)
    assert info.value.status_code == 405
