"""One request must not hurt the others batched with it: a row without a usable distribution,
or a step that raises with one request in it, fails that request alone; its batch-mates produce
exactly the tokens of a clean run, and no KV block leaks (the `make_engine` fixture checks)."""
from __future__ import annotations

import pytest
import torch

from mesh.engine.errors import SequenceError
from mesh.engine.sampler import sample
from mesh.engine.sampling_params import SamplingParams
from mesh.engine.sequence import Sequence
from tests.engine.helpers import PROMPTS, drain

INNOCENT = {
    "greedy": (PROMPTS[0], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)),
    "seeded": (PROMPTS[1], SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)),
    "logprobs": (PROMPTS[2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=True)),
    "stop": (PROMPTS[3], SamplingParams(max_tokens=8, temperature=0, stop=["zzzz"], ignore_eos=True)),
}


def run(engine, requests: dict[str, tuple]) -> dict[str, list]:
    """Adds half the requests, steps twice, adds the rest (so steps mix prefills and decodes),
    runs to the end; each request id's outputs."""
    outputs: dict[str, list] = {rid: [] for rid in requests}
    items = list(requests.items())
    for rid, (prompt, params) in items[:2]:
        engine.add_request(prompt, params, request_id=rid)
    steps = [engine.step(), engine.step()]
    for rid, (prompt, params) in items[2:]:
        engine.add_request(prompt, params, request_id=rid)
    for o in [o for step in steps for o in step] + list(drain(engine)):
        outputs[o.request_id].append(o)
    return outputs


def result(outputs: list) -> tuple:
    return ([t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs),
            [lp for o in outputs for lp in (o.logprobs or [])], outputs[-1].finish_reason)


def assert_clean(got: dict[str, list], clean: dict[str, list]) -> None:
    for rid in INNOCENT:
        assert result(got[rid]) == result(clean[rid]), rid
        assert all(o.error is None for o in got[rid])


def test_the_sampler_fails_only_the_rows_without_a_distribution():
    seqs = [Sequence([1, 2], SamplingParams(temperature=0)),
            Sequence([1, 2], SamplingParams(temperature=0)),  # NaN logits
            Sequence([1, 2], SamplingParams(temperature=0, stop_token_ids=list(range(8)), min_tokens=2,
                                            ignore_eos=True)),  # bans every token
            Sequence([1, 2], SamplingParams(temperature=1.0, seed=9)),
            Sequence([1, 2], SamplingParams(temperature=1.0, seed=9))]
    object.__setattr__(seqs[4].params, "temperature", 1e-300)  # as if it had slipped past validation
    logits = torch.log_softmax(torch.arange(8.0), -1).repeat(5, 1)
    logits[1, 3] = float("nan")
    out = sample(logits.clone(), seqs, eos_ids=())
    assert sorted(out.failed) == [1, 2, 4]
    assert "NaN" in out.failed[1] and "every token is banned" in out.failed[2] and "overflow" in out.failed[4]
    assert out.tokens[0] == 7
    assert out.tokens[3] == sample(logits[3:4].clone(), seqs[3:4], eos_ids=()).tokens[0]  # as if alone


def test_a_request_whose_logits_overflow_at_its_temperature_fails_alone(checkpoint, make_engine):
    poison = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    object.__setattr__(poison, "temperature", 1e-300)  # validation refuses it: this is the engine's own guard
    clean = run(make_engine(checkpoint(), max_num_batched_tokens=16), INNOCENT)
    got = run(make_engine(checkpoint(), max_num_batched_tokens=16), {**INNOCENT, "poison": (PROMPTS[1], poison)})
    (failed,) = got["poison"]
    assert failed.finish_reason == "error" and isinstance(failed.error, SequenceError)
    assert "logits over temperature 1e-300 overflow" in str(failed.error)
    assert_clean(got, clean)


@pytest.mark.parametrize("after_tokens", [0, 3], ids=["in its prefill", "at its fourth token"])
def test_a_step_that_raises_fails_only_the_request_it_raises_for(after_tokens, checkpoint, make_engine):
    """The fault point raises part-way through every step of "poison" (layer 0's KV written);
    the engine runs the step again in halves until "poison" alone fails. Its prompt is that of a
    request that started before it, one whole block: its prefill copies that cached block."""
    requests = {**INNOCENT, "poison": (PROMPTS[0], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))}
    clean = run(make_engine(checkpoint(), max_num_batched_tokens=16), requests)
    faulty = make_engine(checkpoint(), max_num_batched_tokens=16, fail_steps={"poison": after_tokens})
    got = run(faulty, requests)
    *before, failed = got["poison"]
    assert [t for o in before for t in o.token_ids] == result(clean["poison"])[0][:after_tokens]
    assert failed.finish_reason == "error" and isinstance(failed.error, SequenceError)
    assert "fault injected into the step of request(s) poison" in str(failed.error)
    assert_clean(got, clean)


def test_a_failed_prefill_only_request_frees_its_blocks(checkpoint, make_engine):
    engine = make_engine(checkpoint(), fail_steps={"poison": 0})
    engine.add_request(PROMPTS[3], SamplingParams(max_tokens=4), request_id="poison", prefill_only=True)
    (failed,) = list(drain(engine))
    assert failed.finish_reason == "error" and "fault injected" in str(failed.error)
    # the fixture checks that no block is held for a decode side that will never ask

