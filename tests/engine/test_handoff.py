"""The prefill-to-decode handoff in the engine: a request prefilled on one engine and decoded on
another gives exactly what one engine alone gives, for every sampling option (text, tokens,
log-probabilities, finish reason), with the text streamed in deltas as a client sees it."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from mesh.engine.sampling_params import SamplingParams
from tests.engine.helpers import drain

PROMPT = "Hello"


@dataclass
class Result:
    tokens: list[int]
    text: str  # the deltas joined, as a streaming client reads them
    logprobs: list[float] | None
    finish_reason: str


def collect(outputs) -> Result:
    outputs = list(outputs)
    logprobs = [lp for o in outputs for lp in (o.logprobs or [])]
    return Result([t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs),
                  logprobs or None, outputs[-1].finish_reason)


def alone(engine, params) -> Result:
    return collect(engine.stream(PROMPT, params))


def handed_over(prefill, decode, params, sent: tuple = ()) -> Result:
    """Prefills on one engine, moves the KV blocks, decodes on the other (as the mesh does).
    sent: outputs another engine sent before the request moved here."""
    ids = prefill.tokenizer.encode(PROMPT)
    tokens = [t for o in sent for t in o.token_ids]
    rid = prefill.add_request(ids, params, prefill_only=True, output_ids=tokens)
    (first,) = list(drain(prefill))
    if first.finish_reason != "prefilled":
        return collect([*sent, first])
    kv = prefill.kv.export_blocks(prefill.held_blocks(rid))
    prefill.release(rid)
    blocks = decode.blocks.allocate(decode.blocks.blocks_for(len(ids) + len(tokens) + 1))
    decode.kv.import_blocks(blocks[:kv.shape[2]], kv)
    decode.add_prefilled(ids, tokens + first.token_ids, params, blocks, request_id=rid)
    return collect([*sent, first, *drain(decode)])


@pytest.fixture(scope="module")
def engines(checkpoint):
    """Three engines on one checkpoint: one alone, and a prefill and a decode side."""
    from mesh.engine.config import EngineConfig
    from mesh.engine.engine import Engine

    def make():
        return Engine(EngineConfig(model=str(checkpoint()), dtype="float32", block_size=4, num_blocks=64))

    made = make(), make(), make()
    yield made
    for engine in made:
        assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks


@pytest.fixture(scope="module")
def greedy(engines) -> Result:
    return alone(engines[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))


def stop_across(engines, greedy, tokens: int) -> list[str]:
    """A stop string that starts in the text of the first `tokens` tokens and ends after it."""
    before = len(engines[0].tokenizer.decode(greedy.tokens[:tokens]))
    assert 2 <= before < len(greedy.text) - 2, "the test needs another prompt"
    return [greedy.text[before - 1:before + 2]]


CASES = {
    "greedy": lambda e, g: {"temperature": 0},
    "stop string never met": lambda e, g: {"temperature": 0, "stop": ["zzzz"]},  # the issue's case
    "stop string across the handoff": lambda e, g: {"temperature": 0, "stop": stop_across(e, g, 1)},
    "stop string across a move after 3 tokens": lambda e, g: {"temperature": 0, "stop": stop_across(e, g, 3)},
    "stop string in the first token": lambda e, g: {"temperature": 0, "stop": [g.text[:2]]},
    "stop string later on": lambda e, g: {"temperature": 0, "stop": [g.text[-4:-1]]},
    "stop token": lambda e, g: {"temperature": 0, "stop_token_ids": [g.tokens[4]]},
    "stop token held back by min_tokens": lambda e, g: {"temperature": 0, "stop_token_ids": [g.tokens[1]],
                                                        "min_tokens": 3},
    "seed": lambda e, g: {"temperature": 0.9, "seed": 1234},
    "seed, top-k and top-p": lambda e, g: {"temperature": 1.3, "top_k": 20, "top_p": 0.8, "seed": 2**63 - 1},
    "logprobs": lambda e, g: {"temperature": 0, "logprobs": True},
    "logprobs of a seeded sample": lambda e, g: {"temperature": 0.7, "seed": 5, "logprobs": True},
}


@pytest.mark.parametrize("case", CASES)
def test_a_handed_over_request_equals_one_engine_alone(case, engines, greedy):
    params = SamplingParams(max_tokens=12, ignore_eos=True, **CASES[case](engines, greedy))
    expected = alone(engines[0], params)
    got = handed_over(engines[1], engines[2], params)
    assert got.text == expected.text
    assert got.tokens == expected.tokens and got.finish_reason == expected.finish_reason
    if params.logprobs:
        assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    if params.stop and case != "stop string never met":
        assert expected.finish_reason == "stop"  # the case stops where it says


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("stop string in the first token",
                                                                 "stop string across the handoff")])
def test_a_request_moved_mid_way_equals_one_engine_alone(case, engines, greedy):
    """A request that moves after 3 tokens (its actor failed or drained) is computed again
    from its prompt and the tokens sent, prefilled on one engine and decoded on another."""
    params = SamplingParams(max_tokens=12, ignore_eos=True, **CASES[case](engines, greedy))
    expected = alone(engines[0], params)
    assert len(expected.tokens) > 3, "the request must run past the move"
    stream = engines[0].stream(PROMPT, params)
    sent = tuple(next(stream) for _ in range(3))
    stream.close()  # the first actor is gone
    got = handed_over(engines[1], engines[2], params, sent)
    assert got.text == expected.text
    assert got.tokens == expected.tokens and got.finish_reason == expected.finish_reason
    if params.logprobs:
        assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
