"""Disaggregated output equals one engine's, for every sampling option: through the real gateway
(a 1 prefill + 1 decode mesh, KV handed over between them) with the real `openai` client,
completions and chat, streamed and not, against `Engine.generate` on the same checkpoint."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.gateway.support import ENGINE

MAX_TOKENS = 8
PROMPT = "Hello"
MESSAGES = [{"role": "user", "content": "Hello"}]


@dataclass
class Output:
    text: str
    tokens: list[int] | None  # when logprobs were asked for (as ids: vLLM's return_tokens_as_token_ids)
    logprobs: list[float] | None
    finish_reason: str


@pytest.fixture(scope="module")
def engine(checkpoint):
    from mesh.engine.config import EngineConfig
    from mesh.engine.engine import Engine

    return Engine(EngineConfig(model=str(checkpoint("llama", "float32")), **ENGINE))


@pytest.fixture(scope="module")
def prompt_text(gateway):
    """The prompt each API sends to the engine (chat: the checkpoint's template rendered)."""
    (scenario,) = gateway.gateway.fleet.scenarios.values()
    return {"completions": PROMPT, "chat": scenario.chat.render(MESSAGES)}


def alone(engine, prompt: str, options: dict, logprobs: bool) -> Output:
    from mesh.engine.sampling_params import SamplingParams

    c = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=logprobs,
                                                 **options))[0]
    return Output(c.text, c.token_ids if logprobs else None, c.logprobs, c.finish_reason)


def stop_across_the_handoff(engine, greedy: Output) -> str:
    """Three characters from the first token's text into the second's."""
    first = len(engine.tokenizer.decode(greedy.tokens[:1]))
    assert first >= 2, "the test needs a first token of two characters or more"
    return greedy.text[first - 1:first + 2]


CASES = {  # name -> options, from one engine's greedy output for the same prompt
    "stop string never met": lambda e, g: {"temperature": 0, "stop": ["zzzz"]},  # the issue's example
    "stop string across the handoff": lambda e, g: {"temperature": 0, "stop": [stop_across_the_handoff(e, g)]},
    "stop string later on": lambda e, g: {"temperature": 0, "stop": [g.text[-4:-1], "zzzz"]},
    "stop token": lambda e, g: {"temperature": 0, "stop_token_ids": [g.tokens[3]]},
    "stop token held back by min_tokens": lambda e, g: {"temperature": 0, "stop_token_ids": [g.tokens[1]],
                                                        "min_tokens": 3},
    "seed": lambda e, g: {"temperature": 0.9, "seed": 1234},
    "seed, top-k and top-p": lambda e, g: {"temperature": 1.3, "top_k": 20, "top_p": 0.8, "seed": 2**63 - 1},
}
STOPS = {"stop string never met": "length", "stop string across the handoff": "stop",
         "stop string later on": "stop", "stop token": "stop"}
EXTRA = ("stop_token_ids", "min_tokens", "top_k")  # vLLM's extensions: in extra_body


def completions(client, model, prompt, options: dict, stream: bool, logprobs: bool) -> Output:
    kwargs, extra = _split(options)
    response = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, stream=stream,
                                         logprobs=1 if logprobs else None, extra_body=extra, **kwargs)
    if stream:
        chunks = [c.choices[0] for c in response if c.choices]
        return Output("".join(c.text for c in chunks), None, None, chunks[-1].finish_reason)
    choice = response.choices[0]
    lp = choice.logprobs
    return Output(choice.text, lp and token_ids(lp.tokens), lp and lp.token_logprobs, choice.finish_reason)


def chat(client, model, options: dict, stream: bool, logprobs: bool) -> Output:
    kwargs, extra = _split(options)
    response = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=stream,
                                              logprobs=logprobs, extra_body=extra, **kwargs)
    if stream:
        chunks = [c.choices[0] for c in response if c.choices]
        return Output("".join(c.delta.content or "" for c in chunks), None, None, chunks[-1].finish_reason)
    choice = response.choices[0]
    content = choice.logprobs.content if logprobs else None
    return Output(choice.message.content, content and token_ids(c.token for c in content),
                  content and [c.logprob for c in content], choice.finish_reason)


def _split(options: dict) -> tuple[dict, dict]:
    return ({k: v for k, v in options.items() if k not in EXTRA},
            {"ignore_eos": True, "return_tokens_as_token_ids": True,
             **{k: v for k, v in options.items() if k in EXTRA}})


def token_ids(tokens) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize("case", CASES)
def test_disaggregated_output_equals_one_engine(case, api, client, model, engine, prompt_text):
    prompt = prompt_text[api]
    greedy = alone(engine, prompt, {"temperature": 0}, logprobs=True)
    options = CASES[case](engine, greedy)
    for stream, logprobs in ((False, True), (True, False)):  # token ids and logprobs come with logprobs
        expected = alone(engine, prompt, options, logprobs)
        got = (completions(client, model, prompt, options, stream, logprobs) if api == "completions"
               else chat(client, model, options, stream, logprobs))
        where = f"{api}, {'streamed' if stream else 'whole'}"
        assert got.text == expected.text, where
        assert got.finish_reason == expected.finish_reason, where
        assert got.tokens == expected.tokens, where
        if logprobs:
            assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-4), where
    if case in STOPS:
        assert expected.finish_reason == STOPS[case]  # the case is what it says
