"""Prefix-aware forwarding as plain objects: the actors' prefix records, the dispatcher's index
of them, and the offer order they give the router."""
from __future__ import annotations

from dataclasses import dataclass, field

from mesh.api import ActorReport, ActorState, LoadReport, PrefixReport, Role
from mesh.prefix_index import PrefixIndex, PrefixRecord, chunk_tokens_for
from mesh.routing import ForwardOnRejection

SYSTEM = list(range(1000, 1128))  # a shared prompt of two 64-token chunks


@dataclass
class Actor:
    actor_id: str
    queued: int = 0
    record: PrefixRecord = field(default_factory=lambda: PrefixRecord(64, capacity_tokens=64 * 8))

    @property
    def info(self) -> ActorReport:
        return ActorReport(self.actor_id, "s", Role.PREFILL, ActorState.SERVING,
                           load=LoadReport(100 * self.queued, self.queued), prefix=self.record.report())


def order(actors, prompt, index=None):
    index = index or PrefixIndex()
    index.sync({a.actor_id: a.info.prefix for a in actors})
    cached = index.expected_tokens(prompt, [a.actor_id for a in actors])
    return [a.actor_id for a in ForwardOnRejection().prefill_order(actors, cached)], cached


def test_the_actor_holding_the_longest_prefix_is_offered_first_then_idle_first():
    a, b, c, d = Actor("a"), Actor("b", queued=3), Actor("c", queued=1), Actor("d", queued=2)
    b.record.touch(SYSTEM + [1] * 70)  # the whole shared prompt and a chunk more
    c.record.touch(SYSTEM[:64] + [5] * 64)  # only its first chunk
    names, cached = order([a, b, c, d], SYSTEM + [1] * 64 + [9] * 3)
    assert names == ["b", "c", "a", "d"]
    assert cached == {"a": 0, "b": 192, "c": 64, "d": 0}


def test_without_a_shared_prefix_the_order_is_idle_first():
    a, b = Actor("a", queued=2), Actor("b")
    a.record.touch(SYSTEM)
    names, cached = order([a, b], list(range(500, 700)))
    assert names == ["b", "a"] and cached == {"a": 0, "b": 0}
    assert ForwardOnRejection().prefill_order([a, b]) == [b, a]


def test_a_record_keeps_what_the_cache_could_hold_least_recently_used_out():
    record = PrefixRecord(64, capacity_tokens=64 * 3)
    x, y = list(range(128)), list(range(500, 628))  # two chunks each
    index = PrefixIndex()

    def expected(prompt):
        index.sync({"a": record.report()})
        return index.expected_tokens(prompt, ["a"])["a"]

    record.touch(x)
    record.touch(y)  # x's first chunk goes: what is left of x is no prefix
    assert len(record) == 3 and expected(x) == 0 and expected(y) == 128
    record.touch(x[:64] + [7] * 10)  # x's first chunk again; x's second chunk, the oldest, goes
    assert expected(x) == 64 and expected(y) == 128
    v = record.version
    record.touch(list(range(10)))  # shorter than a chunk: nothing to record, no new version
    assert record.version == v


def test_records_and_reports_stay_bounded():
    record = PrefixRecord(4, capacity_tokens=10**9, max_entries=16)
    record.touch(list(range(4000)))
    report = record.report()
    assert len(report.hashes) == 16 and report.chunk_tokens == 4
    assert PrefixRecord(64, capacity_tokens=0).report().hashes == ()
    off = PrefixRecord(64, capacity_tokens=0)  # the engine caches no prefix: nothing to report
    off.touch(SYSTEM)
    assert off.report() == PrefixReport(64, 0, ())


def test_the_index_follows_new_reports_and_placements_and_forgets_gone_actors():
    a, b = Actor("a"), Actor("b")
    index = PrefixIndex(max_entries=4)
    index.sync({"a": a.info.prefix, "b": b.info.prefix})
    prompt = SYSTEM + [3] * 64
    index.placed("b", prompt)  # the dispatcher had b prefill it
    assert index.expected_tokens(prompt, ["a", "b"]) == {"a": 0, "b": 192}
    index.sync({"a": a.info.prefix, "b": b.info.prefix})  # b's report is the same version: kept
    assert index.expected_tokens(prompt, ["b"]) == {"b": 192}
    b.record.touch(list(range(64)))  # a newer report replaces the placements it does not show
    index.sync({"a": a.info.prefix, "b": b.info.prefix})
    assert index.expected_tokens(prompt, ["b"]) == {"b": 0}
    index.placed("b", list(range(64 * 9)))  # bounded between reports too
    assert index.expected_tokens(list(range(64 * 9)), ["b"]) == {"b": 64 * 4}
    index.sync({"a": a.info.prefix})  # b left the pool
    assert index.expected_tokens(prompt, ["b"]) == {"b": 0}
    index.placed("b", prompt)  # no report, no chunk size: nothing is assumed
    assert index.expected_tokens(prompt, ["b"]) == {"b": 0}


def test_chunks_are_whole_engine_blocks():
    assert chunk_tokens_for(16) == 64 and chunk_tokens_for(48) == 96 and chunk_tokens_for(128) == 128
    assert chunk_tokens_for(4, 10) == 12


def test_only_the_first_holders_go_ahead_of_idle_actors():
    actors = [Actor(name, queued=q) for name, q in (("h1", 4), ("h2", 3), ("h3", 1), ("idle", 0))]
    for a in actors[:3]:
        a.record.touch(SYSTEM)
    names, _ = order(actors, SYSTEM + [2] * 5)
    assert names == ["h3", "h2", "idle", "h1"]  # two holders, least queued first; then idle-first


def test_a_busy_holder_accepts_only_when_its_queue_costs_less_than_its_cache_saves():
    from mesh.admission import Offer, PrefillAdmission, PrefillLoad

    policy = PrefillAdmission()
    busy = PrefillLoad(queued_tokens=500, queued_requests=2, tokens_per_s=1000.0)
    plain = policy.decide(busy, Offer(1000, ttft_budget_s=10.0))
    assert plain.accept and plain.predicted_ttft_s == 1.5
    held = policy.decide(busy, Offer(1000, ttft_budget_s=10.0, cached_tokens=900))
    assert held.accept and held.predicted_ttft_s == 0.6  # 0.5 s of queue, 0.1 s of suffix
    short = policy.decide(busy, Offer(1000, ttft_budget_s=10.0, cached_tokens=300))
    assert not short.accept and "costs more than the cache saves" in short.reason  # an idle actor: 1.0 s
    whole = policy.decide(PrefillLoad(0, 0, 1000.0), Offer(64, 1.0, cached_tokens=64))
    assert whole.accept and whole.predicted_ttft_s == 0.001  # the last token always runs
