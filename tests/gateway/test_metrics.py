"""/metrics of the real gateway after real requests: the token counters count what the
clients were sent, the actors' load and prefix cache are there per actor with the model's
name, the histograms have a bucket at each SLO target, and there is a build-info gauge and no
`_created` series."""
from __future__ import annotations

import importlib.metadata

from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.support import http


def scrape(gateway) -> dict[str, list]:
    """{sample name: [samples]}, after the actors' load reports are refreshed."""
    gateway.run(gateway.gateway.fleet.refresh())
    status, body = http(gateway, "/metrics", key=None)
    assert status == 200
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def total(samples: dict[str, list], name: str, **labels) -> float:
    return sum(s.value for s in samples.get(name, ()) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_token_counters_count_what_the_clients_got(gateway, client, model):
    before = scrape(gateway)
    usage = [client.completions.create(model=model, prompt=f"count my tokens {i}", max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True}).usage for i in range(2)]
    after = scrape(gateway)
    labels = {"model_name": model, "scenario": "default"}
    for name, field in (("pdmesh:prompt_tokens_total", "prompt_tokens"),
                        ("pdmesh:generation_tokens_total", "completion_tokens")):
        grown = total(after, name, **labels) - total(before, name, **labels)
        assert grown == sum(getattr(u, field) for u in usage), name
    for name in ("pdmesh:time_to_first_token_seconds_count", "pdmesh:e2e_request_latency_seconds_count",
                 "pdmesh:request_time_per_output_token_seconds_count"):
        assert total(after, name, **labels) - total(before, name, **labels) == 2, name


def test_each_actor_reports_its_requests_kv_and_prefix_cache(gateway, client, model):
    prompt = "the same long prompt, sent twice so that its blocks are found the second time"
    before = scrape(gateway)
    for _ in range(2):
        client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    after = scrape(gateway)
    actors = {info.actor_id: info for info in gateway.gateway.fleet.actor_infos()["default"]}
    for name in ("pdmesh:num_requests_running", "pdmesh:num_requests_waiting", "pdmesh:kv_cache_usage_perc",
                 "pdmesh:kv_blocks", "pdmesh:prefix_cache_queries_total", "pdmesh:prefix_cache_hits_total"):
        by_actor = {s.labels["actor"]: s for s in after[name]}
        assert set(by_actor) == set(actors), name
        for actor_id, s in by_actor.items():
            assert s.labels["model_name"] == model and s.labels["role"] == actors[actor_id].role.value, s
    for s in after["pdmesh:kv_cache_usage_perc"]:
        assert 0 <= s.value <= 1
    # (not 0: an actor may report before its last request's clean-up ran, after the client had its answer)
    assert all(s.value >= 0 for s in after["pdmesh:num_requests_running"] + after["pdmesh:num_requests_waiting"])
    prefill = next(a for a, info in actors.items() if info.role.value == "prefill")
    hits = total(after, "pdmesh:prefix_cache_hits_total", actor=prefill) - \
        total(before, "pdmesh:prefix_cache_hits_total", actor=prefill)
    queries = total(after, "pdmesh:prefix_cache_queries_total", actor=prefill) - \
        total(before, "pdmesh:prefix_cache_queries_total", actor=prefill)
    block = actors[prefill].block_size
    assert hits >= block and hits % block == 0, "the second prompt found no block of the first in the prefill cache"
    assert queries >= hits


def test_buckets_have_the_slo_targets_and_there_is_build_info_and_no_created(gateway, client, model):
    client.completions.create(model=model, prompt="buckets", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    samples = scrape(gateway)
    slo = gateway.gateway.fleet.scenarios["default"].spec.slo
    for name, target in (("pdmesh:time_to_first_token_seconds_bucket", slo.ttft_s),
                         ("pdmesh:request_time_per_output_token_seconds_bucket", slo.tpot_s)):
        assert target in {float(s.labels["le"]) for s in samples[name]}, (name, target)
    for name in ("pdmesh:time_to_first_token_seconds_bucket", "pdmesh:request_time_per_output_token_seconds_bucket"):
        assert {2.0, 0.2} <= {float(s.labels["le"]) for s in samples[name]}, "the default SLO targets"
    [info] = samples["pdmesh:build_info"]
    assert info.value == 1 and info.labels["version"] == importlib.metadata.version("pdmesh")
    assert not [name for name in samples if name.endswith("_created")]


def test_actor_figures_are_read_from_the_load_report_as_vllm_counts_them():
    """running: in flight past the prefill queue; KV usage a share; prefix figures in tokens, not blocks."""
    from gateway.metrics import Metrics
    from mesh.api import ActorReport, ActorState, LoadReport, PrefixCacheStats, Role

    load = LoadReport(queued_prompt_tokens=40, queued_requests=2, active_requests=5, free_blocks=30, num_blocks=40,
                      prefix_cache=PrefixCacheStats(hits=3, queries=7, evictions=0, cached=5))
    reports = {"chat": [ActorReport("p0", "chat", Role.PREFILL, ActorState.SERVING, block_size=16, load=load),
                        ActorReport("d0", "chat", Role.DECODE, ActorState.STARTING)]}
    samples = {}
    for family in text_string_to_metric_families(Metrics(lambda: reports).expose().decode()):
        for s in family.samples:
            samples[s.name, s.labels.get("actor", s.labels.get("state"))] = s.value
    assert samples["pdmesh:num_requests_running", "p0"] == 3 and samples["pdmesh:num_requests_waiting", "p0"] == 2
    assert samples["pdmesh:kv_cache_usage_perc", "p0"] == 0.25
    assert samples["pdmesh:prefix_cache_hits_total", "p0"] == 48
    assert samples["pdmesh:prefix_cache_queries_total", "p0"] == 112
    assert ("pdmesh:num_requests_running", "d0") not in samples  # starting: no load yet, counted by state
    assert samples["pdmesh:actors", "starting"] == 1


def test_a_request_another_scenario_prefilled_counts_as_an_overflow_by_scenario_and_host():
    from gateway.metrics import Metrics
    from mesh.attempt import Event

    metrics = Metrics(dict)
    metrics.record_events("chat", [Event("prefill_rejected", {"actor": "p0", "reason": "busy"}),
                                   Event("prefill_accepted", {"actor": "q0", "forwards": 1,
                                                              "forwarded_to_scenario": "docs"})])
    metrics.record_events("chat", [Event("prefill_accepted", {"actor": "p0", "forwards": 0})])
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.expose().decode()) for s in family.samples}
    assert samples["pdmesh:overflows_total", (("host", "docs"), ("scenario", "chat"))] == 1
    assert sum(v for (name, _), v in samples.items() if name == "pdmesh:overflows_total") == 1
