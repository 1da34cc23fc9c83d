"""Chunked prefill mixed with decode: while a request decodes, a long prompt is prefilled a
chunk per step, each step running the decode too, and both get the tokens they get alone."""
from __future__ import annotations

from mesh.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
LONG = [3 + i % 40 for i in range(50)]


def test_a_long_prompt_never_holds_back_a_running_decode(checkpoint, make_engine):
    folder = checkpoint("llama", "float32")
    alone = make_engine(folder).generate([[5] * 6, LONG], GREEDY)
    engine = make_engine(folder, prefill_chunk_tokens=8)
    engine.add_request([5] * 6, GREEDY, "short")
    tokens = {"short": [], "long": []}
    while not tokens["short"]:  # the short request's prefill: then it decodes
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    engine.add_request(LONG, GREEDY, "long")
    mixed = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        batch = engine.last_batch
        if batch.prefills:
            mixed.append(([s.request_id for s in batch.decodes], [n for _, n in batch.prefills]))
    assert mixed == [(["short"], [8])] * 6 + [(["short"], [2])]  # 50 tokens, 8 a step, each step decoding
    assert [tokens["short"], tokens["long"]] == [c.token_ids for c in alone]


def test_with_nothing_decoding_a_prompt_takes_the_whole_step_budget(checkpoint, make_engine):
    engine = make_engine(checkpoint("llama", "float32"), prefill_chunk_tokens=8, max_num_batched_tokens=32)
    engine.add_request(LONG, GREEDY, "long")
    engine.step()
    assert [n for _, n in engine.last_batch.prefills] == [32]
    engine.abort("long")
