"""Per-request sampling: greedy, seeds, temperature/top-k/top-p, stop tokens and strings,
max_tokens, logprobs. Engine runs use the tiny fp32 Llama; the sampler is also driven
directly with hand-made logits where exact probabilities matter."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from mesh.engine.sampler import sample
from mesh.engine.sampling_params import SamplingParams
from mesh.engine.sequence import Sequence
from tests.engine.helpers import PROMPTS, StepRecorder, drain, hf_logits

PROMPT = "def add(a, b):"


def run(engine, params, prompt=PROMPT):
    return engine.generate([prompt], params)[0]


@pytest.fixture
def llama(checkpoint, make_engine):
    return make_engine(checkpoint())


# -- greedy and seeds ---------------------------------------------------------------------------

def test_greedy_takes_the_argmax_every_step(llama):
    with StepRecorder(llama) as rec:
        c = run(llama, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert c.token_ids == rec.stacked(c.request_id).argmax(-1).tolist()


def test_seeded_sampling_is_reproducible(checkpoint, make_engine):
    def sampled(seed):
        return run(make_engine(checkpoint()), SamplingParams(max_tokens=16, seed=seed, ignore_eos=True)).token_ids

    assert sampled(1) == sampled(1)
    assert sampled(1) != sampled(2)


def test_seeded_sampling_does_not_depend_on_the_batch(checkpoint, make_engine):
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    alone = run(make_engine(checkpoint()), params, PROMPTS[1]).token_ids
    # The same request among others (greedy, unseeded, other seeds), joining mid-way.
    engine = make_engine(checkpoint(), max_num_batched_tokens=16)
    others = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=20, seed=6, ignore_eos=True),
              SamplingParams(max_tokens=20, ignore_eos=True)]
    for p, sp in zip((PROMPTS[0], PROMPTS[2], PROMPTS[3]), others):
        engine.add_request(p, sp)
    engine.step()
    engine.step()
    rid = engine.add_request(PROMPTS[1], params)
    outputs = [o for o in drain(engine) if o.request_id == rid]
    assert [t for o in outputs for t in o.token_ids] == alone


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=1.0, top_k=1, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True),
], ids=["top_k=1", "tiny top_p"])
def test_top_k_1_and_tiny_top_p_are_greedy(params, llama):
    greedy = run(llama, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)).token_ids
    assert run(llama, params).token_ids == greedy


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p."""
    probs, order = torch.softmax(logits / temperature, -1).sort(descending=True)
    keep = (probs.cumsum(0) - probs) < top_p
    return set(order[keep].tolist())


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 5, 1.0), (0.05, 0, 0.5), (2.0, 40, 0.3)])
def test_sampled_tokens_lie_in_the_allowed_set(temperature, top_k, top_p, llama):
    params = SamplingParams(max_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p, seed=11,
                            ignore_eos=True)
    with StepRecorder(llama) as rec:
        c = run(llama, params)
    for token, logits in zip(c.token_ids, rec.logits[c.request_id]):
        if top_k:
            assert token in logits.topk(top_k).indices.tolist()
        if top_p < 1:
            kept = logits.masked_fill(logits < logits.topk(top_k).values[-1], -math.inf) if top_k else logits
            assert token in nucleus(kept, temperature, top_p)


def draw(probs: list[float], n: int, **options) -> Counter:
    """n tokens drawn by the sampler from one fixed distribution, by n sequences seeded 0..n-1."""
    logits = torch.log(torch.tensor(probs + [0.0] * 13))
    return Counter(sample(logits.repeat(1, 1), [Sequence([1], SamplingParams(seed=seed, **options))], ()).tokens[0]
                   for seed in range(n))


def frequencies(counts: Counter, n: int) -> list[float]:
    return [counts[i] / n for i in range(max(counts) + 1)]


@pytest.mark.parametrize("options, expected", [
    ({}, [0.5, 0.3, 0.2]),
    ({"temperature": 0.5}, [25 / 38, 9 / 38, 4 / 38]),  # p ** 2, normalised
    ({"top_k": 2}, [0.625, 0.375]),
    ({"top_p": 0.7}, [0.625, 0.375]),  # 0.5 alone falls short of 0.7, 0.5 + 0.3 reaches it
    ({"top_p": 0.45}, [1.0]),
])
def test_sampler_frequencies_follow_temperature_top_k_top_p(options, expected):
    n = 1500  # seeded, so deterministic; 0.04 is over 3 standard deviations of a frequency here
    got = frequencies(draw([0.5, 0.3, 0.2], n, **options), n)
    assert len(got) == len(expected)  # no token outside the allowed set, ever
    assert got == pytest.approx(expected, abs=0.04)


# -- stopping -----------------------------------------------------------------------------------

@pytest.fixture
def reference(llama):
    """A greedy 24-token completion to pick stop tokens and strings from."""
    return run(llama, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))


def first_repeat_free_index(tokens: list[int], at_least: int) -> int:
    """An index k >= at_least whose token does not occur earlier, so stopping on it stops at k."""
    return next(k for k in range(at_least, len(tokens)) if tokens[k] not in tokens[:k])


def test_max_tokens_ends_with_length(reference):
    assert len(reference.token_ids) == 24 and reference.finish_reason == "length"


def test_reaching_the_context_length_ends_with_length(checkpoint, make_engine):
    engine = make_engine(checkpoint(), max_model_len=16)
    c = run(engine, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), list(range(10, 22)))
    assert len(c.token_ids) == 4 and c.finish_reason == "length"  # 12 + 4 = 16 tokens


def test_stop_token_id_ends_the_request_on_that_token(llama, reference):
    k = first_repeat_free_index(reference.token_ids, 3)
    stop = reference.token_ids[k]
    c = run(llama, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop]))
    assert c.token_ids == reference.token_ids[:k + 1] and c.finish_reason == "stop"


def test_min_tokens_holds_back_stop_tokens(llama, reference):
    k = first_repeat_free_index(reference.token_ids, 3)
    stop = reference.token_ids[k]
    c = run(llama, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop], min_tokens=k + 2))
    assert c.token_ids[:k] == reference.token_ids[:k]
    assert stop not in c.token_ids[:k + 1] and len(c.token_ids) >= k + 2


def test_eos_stops_unless_ignored(edited_checkpoint, make_engine, reference):
    # Make a token the model emits greedily the checkpoint's EOS.
    k = first_repeat_free_index(reference.token_ids, 3)
    engine = make_engine(edited_checkpoint("llama", eos_token_id=reference.token_ids[k]))
    stopped = run(engine, SamplingParams(max_tokens=24, temperature=0))
    assert stopped.token_ids == reference.token_ids[:k + 1] and stopped.finish_reason == "stop"
    ignored = run(engine, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert ignored.token_ids == reference.token_ids and ignored.finish_reason == "length"


def stream_texts(engine, params) -> tuple[list[str], str | None]:
    deltas = list(engine.stream(PROMPT, params))
    return [d.text for d in deltas], deltas[-1].finish_reason


def test_stop_string_cuts_the_text_before_it_and_never_leaks(llama, reference):
    text = reference.text
    # Four visible characters straddling a token boundary, about a third of the way in.
    boundaries = (len(llama.tokenizer.decode(reference.token_ids[:k])) for k in range(8, 20))
    stop = next(s for b in boundaries if len(s := text[b - 2:b + 2]) == 4 and s.strip())
    deltas, reason = stream_texts(llama, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                        stop=[stop]))
    assert reason == "stop"
    # Deltas are only ever appended, so if their sum ends before the stop string,
    # no delta carried any part of it.
    assert "".join(deltas) == text[:text.find(stop)]
    assert sum(1 for d in deltas if d) > 1, "text should stream, not arrive at the end"


def test_the_earliest_of_several_stop_strings_wins(llama, reference):
    text = reference.text
    early, late = text[6:9], text[-4:]
    c = run(llama, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[late, early]))
    assert c.text == text[:min(text.find(early), text.find(late))] and c.finish_reason == "stop"
    assert len(c.text) <= 6


def test_held_back_text_is_released_when_no_stop_string_appears(llama, reference):
    deltas, reason = stream_texts(llama, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                        stop=["\x00never\x00"]))
    assert reason == "length"
    assert "".join(deltas) == reference.text == llama.tokenizer.decode(reference.token_ids)


# -- logprobs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=True),
    # Logprobs are of the model's own distribution, before temperature and top-p.
    SamplingParams(max_tokens=10, temperature=0.7, top_p=0.9, seed=4, ignore_eos=True, logprobs=True),
], ids=["greedy", "sampled"])
def test_logprobs_of_chosen_tokens_match_hf_log_softmax(params, checkpoint, hf_model, llama):
    ids = llama.tokenizer.encode(PROMPT)
    c = run(llama, params, ids)
    logits = hf_logits(hf_model(checkpoint()), ids + c.token_ids)[len(ids) - 1:-1]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert torch.tensor(c.logprobs) == pytest.approx(expected, abs=1e-4)


def test_logprobs_only_for_requests_that_ask(llama):
    asking, silent = (SamplingParams(max_tokens=3, temperature=0, logprobs=flag) for flag in (True, False))
    with_lp, without = llama.generate([PROMPT, PROMPTS[2]], [asking, silent])  # one batch, both kinds
    assert len(with_lp.logprobs) == 3 and all(lp <= 0 for lp in with_lp.logprobs)
    assert without.logprobs is None
    assert all(d.logprobs is None for d in llama.stream(PROMPT, silent))


def test_top_logprobs_are_the_most_likely_tokens_of_the_models_distribution(checkpoint, hf_model, llama):
    ids = llama.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True, logprobs=True, top_logprobs=4)
    outs = list(llama.stream(ids, params))
    tokens = [t for o in outs for t in o.token_ids]
    top = [t for o in outs for t in o.top_logprobs]
    logits = hf_logits(hf_model(checkpoint()), ids + tokens)[len(ids) - 1:-1]
    expected = torch.log_softmax(logits, -1).topk(4, dim=-1)
    assert [[t for t, _ in row] for row in top] == expected.indices.tolist()
    assert torch.tensor([[lp for _, lp in row] for row in top]) == pytest.approx(expected.values, abs=1e-4)
    assert all(o.top_logprobs is None for o in llama.stream(PROMPT, SamplingParams(max_tokens=2, logprobs=True)))


def test_top_logprobs_per_row_in_one_batch():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    seqs = [Sequence([1], SamplingParams(temperature=0, logprobs=True, top_logprobs=k)) for k in (2, 0, 1)]
    out = sample(logits.clone(), seqs, ())
    lsm = torch.log_softmax(logits, -1)
    assert [[t for t, _ in row] for row in out.top_logprobs] == [[1, 3], [], [3]]
    assert out.top_logprobs[0][1][1] == pytest.approx(lsm[0, 3].item())
    assert sample(logits.clone(), seqs[1:2], ()).top_logprobs is None


def test_top_logprobs_need_logprobs_and_a_bound():
    from mesh.engine.errors import RequestError

    with pytest.raises(RequestError, match="top_logprobs needs logprobs"):
        SamplingParams(top_logprobs=2)
    with pytest.raises(RequestError, match=r"top_logprobs must be an integer in \[0, 20\]"):
        SamplingParams(logprobs=True, top_logprobs=21)
