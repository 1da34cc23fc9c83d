"""Continuous batching, memory admission, preemption, abort, streaming and KV hand-off on a real
tiny model. Every engine is checked by the `make_engine` fixture for leaked blocks when a test ends."""
from __future__ import annotations

import pytest

from mesh.engine.sampling_params import SamplingParams
from tests.engine.helpers import collect, drain, prompt

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def alone(make_engine, folder, prompt_ids, params) -> list[int]:
    """The tokens a request gets with a roomy engine to itself."""
    return make_engine(folder).generate([prompt_ids], params)[0].token_ids


def waiting_ids(engine) -> set[str]:
    return {s.request_id for s in engine.scheduler.waiting}


def running_ids(engine) -> set[str]:
    return {s.request_id for s in engine.scheduler.running}


def test_requests_join_and_leave_between_steps(checkpoint, make_engine):
    folder = checkpoint()
    engine = make_engine(folder)
    short, long = SamplingParams(max_tokens=3, temperature=0), SamplingParams(max_tokens=14, temperature=0)
    a = engine.add_request(prompt(5), short)
    b = engine.add_request(prompt(9, 300), long)
    outputs: dict[str, list[int]] = {}
    collect(engine, outputs, steps=2)
    assert running_ids(engine) == {a, b}
    c = engine.add_request(prompt(7, 500), short)  # joins while a and b decode
    while a in running_ids(engine) or c not in running_ids(engine):
        collect(engine, outputs, steps=1)
    assert running_ids(engine) == {b, c}  # a left, c joined, b went on
    collect(engine, outputs)
    assert outputs[a] == alone(make_engine, folder, prompt(5), short)
    assert outputs[b] == alone(make_engine, folder, prompt(9, 300), long)
    assert outputs[c] == alone(make_engine, folder, prompt(7, 500), short)


def test_batch_never_exceeds_max_num_seqs(checkpoint, make_engine):
    folder = checkpoint()
    engine = make_engine(folder, max_num_seqs=2)
    rids = [engine.add_request(prompt(4 + i, 100 * i), GREEDY) for i in range(5)]
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        collect(engine, outputs, steps=1)
        assert len(engine.scheduler.running) <= 2
    for i, rid in enumerate(rids):
        assert outputs[rid] == alone(make_engine, folder, prompt(4 + i, 100 * i), GREEDY)


def test_request_waits_for_free_blocks_and_runs_once_others_finish(checkpoint, make_engine):
    folder = checkpoint()
    # 8 blocks of 4 tokens: the first request takes 5 blocks for its prompt (6 by its end),
    # the second needs 4 for its prompt, so it must wait.
    engine = make_engine(folder, num_blocks=8, block_size=4)
    first_params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    first = engine.add_request(prompt(20), first_params)
    second = engine.add_request(prompt(14, 400), GREEDY)
    outputs: dict[str, list[int]] = {}
    while first in running_ids(engine):
        assert second in waiting_ids(engine), "admitted without enough free blocks"
        collect(engine, outputs, steps=1)
    collect(engine, outputs)
    assert outputs[first] == alone(make_engine, folder, prompt(20), first_params)
    assert outputs[second] == alone(make_engine, folder, prompt(14, 400), GREEDY)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_preemption_under_memory_pressure_gives_the_same_outputs(params, checkpoint, make_engine):
    folder = checkpoint()
    # Two requests grow to 32 tokens = 8 blocks each, in a cache of 10 blocks: the newer
    # one is preempted and later recomputed from its prompt and the tokens it already made.
    engine = make_engine(folder, num_blocks=10, block_size=4)
    rids = [engine.add_request(prompt(8, start), params) for start in (100, 600)]
    outputs: dict[str, list[int]] = {}
    preempted = False
    while engine.has_unfinished():
        collect(engine, outputs, steps=1)
        preempted |= any(s.output_token_ids for s in engine.scheduler.waiting)
    assert preempted, "the test meant to force a preemption"
    for rid, start in zip(rids, (100, 600)):
        assert outputs[rid] == alone(make_engine, folder, prompt(8, start), params)


def test_sequence_outgrowing_the_whole_cache_finishes_instead_of_hanging(checkpoint, make_engine):
    engine = make_engine(checkpoint(), num_blocks=4, block_size=4)  # 16 tokens in all
    big = engine.add_request(prompt(5), SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    small = engine.add_request(prompt(3, 700), SamplingParams(max_tokens=2, temperature=0))
    finished = {}
    try:
        for o in drain(engine, max_steps=200):
            if o.finished:
                finished[o.request_id] = o.finish_reason
        assert finished == {big: "length", small: "length"}
    finally:
        engine.abort(big)
        engine.abort(small)


def test_abort_frees_the_blocks_of_running_and_waiting_requests(checkpoint, make_engine):
    engine = make_engine(checkpoint(), num_blocks=6, block_size=4)
    running = engine.add_request(prompt(16), GREEDY)
    waiting = engine.add_request(prompt(12, 300), GREEDY)  # needs 3 blocks, 2 are free
    engine.step()
    engine.step()
    assert running in running_ids(engine) and waiting in waiting_ids(engine)
    assert engine.blocks.num_free < engine.blocks.num_blocks
    engine.abort(running)
    engine.abort(waiting)
    engine.abort("no-such-request")  # aborting an unknown or finished request is a no-op
    assert not engine.has_unfinished()
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_stream_deltas_add_up_to_the_generated_completion(checkpoint, make_engine):
    folder = checkpoint()
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    engine = make_engine(folder)
    deltas = list(engine.stream("def add(a, b):", params))
    expected = make_engine(folder).generate(["def add(a, b):"], params)[0]
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text
    assert [d.finished for d in deltas] == [False] * 9 + [True]
    assert deltas[-1].finish_reason == "length" and deltas[-1].num_output_tokens == 10


def test_stream_runs_alongside_other_requests(checkpoint, make_engine):
    folder = checkpoint()
    engine = make_engine(folder)
    other = engine.add_request(prompt(6, 800), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    tokens = [t for d in engine.stream(prompt(5), GREEDY) for t in d.token_ids]
    assert tokens == alone(make_engine, folder, prompt(5), GREEDY)
    assert other in running_ids(engine)  # still going, not disturbed
    engine.abort(other)


def test_closing_a_stream_early_frees_its_blocks(checkpoint, make_engine):
    engine = make_engine(checkpoint())
    stream = engine.stream(prompt(9), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    next(stream)
    next(stream)
    assert engine.blocks.num_free < engine.blocks.num_blocks
    stream.close()  # a client going away
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks


def test_prefilled_kv_handed_to_another_engine_decodes_like_one_engine(checkpoint, make_engine):
    """Disaggregated path: a prefill-only request keeps its KV, the blocks are exported,
    imported into a second engine at other block ids, and decoding continues there."""
    folder = checkpoint()
    ids = prompt(10)
    prefill = make_engine(folder)
    decode = make_engine(folder)
    decode.blocks.allocate(5)  # so the decode side's block ids differ from the prefill side's
    rid = prefill.add_request(ids, GREEDY, prefill_only=True)
    (first,) = list(drain(prefill))
    assert first.finish_reason == "prefilled" and first.finished
    kv = prefill.kv.export_blocks(prefill.held_blocks(rid))
    assert prefill.blocks.num_free < prefill.blocks.num_blocks  # held until released
    prefill.release(rid)

    blocks = decode.blocks.allocate(decode.blocks.blocks_for(len(ids) + 1))
    decode.kv.import_blocks(blocks[:kv.shape[2]], kv)
    decode.add_prefilled(ids, first.token_ids, GREEDY, blocks, request_id=rid)
    rest = [t for o in drain(decode) for t in o.token_ids]
    decode.blocks.free(list(range(5)))
    assert first.token_ids + rest == alone(make_engine, folder, ids, GREEDY)


def test_kv_export_import_round_trips_across_block_layouts(checkpoint, make_engine):
    engine = make_engine(checkpoint(), num_blocks=16)
    rid = engine.add_request(prompt(14), GREEDY, prefill_only=True)
    list(drain(engine))
    held = engine.held_blocks(rid)
    data = engine.kv.export_blocks(held)
    assert data.shape[2] == len(held) and data.abs().sum() > 0
    scattered = [15, 9, 12, 7]  # not one run: the gather/scatter path
    engine.kv.import_blocks(scattered, data)
    assert (engine.kv.export_blocks(scattered) == data).all()
    with pytest.raises(ValueError, match="expected"):
        engine.kv.import_blocks(scattered[:2], data)
    engine.release(rid)


def test_generate_alongside_a_queued_request(checkpoint, make_engine):
    folder = checkpoint()
    engine = make_engine(folder)
    other = engine.add_request(prompt(6, 800), GREEDY)
    try:
        (c,) = engine.generate([prompt(5)], GREEDY)
        assert c.token_ids == alone(make_engine, folder, prompt(5), GREEDY)
    finally:
        for _ in drain(engine):  # whatever generate left behind
            pass


def test_interleaved_streams_each_get_all_their_tokens(checkpoint, make_engine):
    folder = checkpoint()
    engine = make_engine(folder)
    prompts = {"a": prompt(5), "b": prompt(7, 300)}
    streams = {name: engine.stream(p, GREEDY) for name, p in prompts.items()}
    got: dict[str, list[int]] = {name: [] for name in prompts}
    rids: dict[str, str] = {}
    pending = set(prompts)
    calls = 0
    try:
        while pending:
            for name in sorted(pending):
                calls += 1
                assert calls < 200, "the streams never finished"
                delta = next(streams[name])
                rids[name] = delta.request_id
                got[name] += delta.token_ids
                if delta.finished:
                    pending.discard(name)
        for name, p in prompts.items():
            assert got[name] == alone(make_engine, folder, p, GREEDY)
    finally:
        for s in streams.values():
            s.close()
