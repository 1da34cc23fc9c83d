"""Prometheus metrics on /metrics: request outcomes, tokens and latencies from the gateway's own
measurements, and the actors' load (requests, KV, prefix cache, roles) read from their last reports.

Names: `pdmesh:` and, where a figure means what vLLM's does, vLLM's own name after the prefix
(`vllm:time_to_first_token_seconds` -> `pdmesh:time_to_first_token_seconds`), so that a vLLM
dashboard works with the prefix swapped; docs/operations.md lists the mapping. Every series of a
request or an actor carries `model_name` (the name clients ask for) and `scenario`. Latency
histograms have a bucket bound at every configured SLO target, so that `le="<target>"` counts
exactly the requests that met it. No `_created` series (their timestamps only add series).
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mesh import ActorReport, ActorState, Event

if TYPE_CHECKING:
    from scenarios.spec import ScenarioSpec

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10, 30, 60)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "pdmesh:"

disable_created_metrics()


def _version() -> str:
    try:
        return importlib.metadata.version("pdmesh")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _buckets(targets: Iterable[float]) -> tuple[float, ...]:
    return tuple(sorted({*LATENCY_BUCKETS, *targets}))


def _default_model_name(spec: ScenarioSpec) -> str:
    return Path(spec.model).name


class Metrics:
    def __init__(self, actor_infos: Callable[[], dict[str, list[ActorReport]]], specs: Iterable[ScenarioSpec] = (),
                 model_name: Callable[[ScenarioSpec], str] = _default_model_name):
        """actor_infos() -> {scenario: [actor info, ...]} as last refreshed; specs: the scenarios
        served (their counters start at 0, so that rate() and increase() answer before the first
        event; their SLO targets become bucket bounds); model_name: the name clients ask for."""
        specs = list(specs)
        self.model_names = {s.name: model_name(s) for s in specs}
        self.registry = r = CollectorRegistry()
        req = ["model_name", "scenario"]
        self.build_info = Gauge(PREFIX + "build_info", "pdmesh's version; always 1", ["version"], registry=r)
        self.build_info.labels(_version()).set(1)
        self.requests = Counter(PREFIX + "requests", "requests finished, by outcome (stop, length, or the "
                                "error: resource_exhausted, cancelled, ...)", [*req, "outcome"], registry=r)
        self.in_flight = Gauge(PREFIX + "requests_in_flight", "requests being served by the gateway", req, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "prompt tokens of the requests admitted", req,
                                     registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "output tokens sent to clients", req,
                                         registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "time to first token, as the gateway sees it",
                              req, buckets=_buckets(s.slo.ttft_s for s in specs), registry=r)
        self.tpot = Histogram(PREFIX + "request_time_per_output_token_seconds", "a request's mean time per output "
                              "token after the first", req, buckets=_buckets(s.slo.tpot_s for s in specs), registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "request latency, end to end", req,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.rejections = Counter(PREFIX + "prefill_rejections", "prefill offers rejected", ["scenario"], registry=r)
        self.forwards = Counter(PREFIX + "forwards", "requests admitted after one or more rejections, "
                                "counted per forward", ["scenario"], registry=r)
        self.overflows = Counter(PREFIX + "overflows", "requests this scenario's prefill actors refused that a "
                                 "prefill actor of another scenario (host) took", ["scenario", "host"], registry=r)
        # path: direct (device or host memory on the wire as it is) or staged (through host buffers)
        self.kv_bytes = Counter(PREFIX + "kv_transfer_bytes", "KV cache bytes moved prefill -> decode",
                                ["scenario", "backend", "path"], registry=r)
        self.kv_seconds = Histogram(PREFIX + "kv_transfer_seconds", "KV transfer time per request",
                                    ["scenario", "backend", "path"], buckets=LATENCY_BUCKETS, registry=r)
        self.decisions = Counter(PREFIX + "controller_decisions", "ratio controller actions, by the scenario the "
                                 "actor was in, the action (flip, lend) and the role it serves afterwards",
                                 ["scenario", "action", "role"], registry=r)
        self.placements = Counter(PREFIX + "placements", "auto mode: requests prefilled on the decode actor "
                                  "(local) or sent to a prefill actor (remote), by the conditional policy; "
                                  "a retried request counts again",
                                  ["scenario", "decision"], registry=r)
        for spec in specs:
            labels = self._labels(spec.name)
            for counter in (self.prompt_tokens, self.generation_tokens):
                counter.labels(*labels)
            self.rejections.labels(spec.name)
            self.forwards.labels(spec.name)
            for action in ("flip", "lend"):
                for role in ("prefill", "decode"):
                    self.decisions.labels(spec.name, action, role)
        r.register(_ActorCollector(actor_infos, self.model_names))

    def _labels(self, scenario: str) -> tuple[str, str]:
        return self.model_names.get(scenario, ""), scenario

    # -- one request, as the gateway serves it ----------------------------------------------------
    def admitted(self, scenario: str, prompt_tokens: int) -> None:
        self.in_flight.labels(*self._labels(scenario)).inc()
        self.prompt_tokens.labels(*self._labels(scenario)).inc(prompt_tokens)

    def first_token(self, scenario: str, ttft_s: float) -> None:
        self.ttft.labels(*self._labels(scenario)).observe(ttft_s)

    def streamed(self, scenario: str, output_tokens: int, tpot_s: float | None) -> None:
        """The request's output ended (or stopped): its tokens, and its TPOT when it had two or more."""
        self.generation_tokens.labels(*self._labels(scenario)).inc(output_tokens)
        if tpot_s is not None:
            self.tpot.labels(*self._labels(scenario)).observe(tpot_s)

    def left(self, scenario: str) -> None:
        """An admitted request is no longer in flight."""
        self.in_flight.labels(*self._labels(scenario)).dec()

    def ended(self, scenario: str, outcome: str, e2e_s: float) -> None:
        self.requests.labels(*self._labels(scenario), outcome).inc()
        self.e2e.labels(*self._labels(scenario)).observe(e2e_s)

    def record_events(self, scenario: str, events: list[Event]) -> None:
        for e in events:
            if e.name == "prefill_rejected":
                self.rejections.labels(scenario).inc()
            elif e.name == "prefill_accepted":
                if e.attributes.get("forwards"):
                    self.forwards.labels(scenario).inc(e.attributes["forwards"])
                if "forwarded_to_scenario" in e.attributes:
                    self.overflows.labels(scenario, e.attributes["forwarded_to_scenario"]).inc()
            elif e.name == "placement":
                self.placements.labels(scenario, e.attributes["decision"]).inc()
            elif e.name == "kv_transfer":
                labels = (scenario, e.attributes.get("backend", ""), e.attributes.get("path", ""))
                self.kv_bytes.labels(*labels).inc(e.attributes.get("bytes", 0))
                self.kv_seconds.labels(*labels).observe(e.attributes.get("duration_s", 0.0))

    def expose(self) -> bytes:
        return generate_latest(self.registry)


class _ActorCollector:
    """Per-actor figures computed at scrape time from the actors' last load reports."""

    def __init__(self, actor_infos: Callable[[], dict[str, list[ActorReport]]], model_names: dict[str, str]):
        self.actor_infos, self.model_names = actor_infos, model_names

    def collect(self):
        labels = ["model_name", "scenario", "actor", "role"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=labels)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, labels=labels)

        running = gauge("num_requests_running", "requests on an actor past their prefill queue")
        waiting = gauge("num_requests_waiting", "requests queued for prefill on an actor")
        queued_tokens = gauge("queued_prompt_tokens", "prompt tokens queued for prefill on an actor")
        usage = gauge("kv_cache_usage_perc", "an actor's KV cache in use; 1 means 100 percent")
        used = gauge("kv_blocks_used", "KV blocks in use on an actor")
        total = gauge("kv_blocks", "KV blocks on an actor")
        queries = counter("prefix_cache_queries", "prompt tokens looked up in an actor's prefix cache "
                          "(since the actor started)")
        hits = counter("prefix_cache_hits", "prompt tokens found in an actor's prefix cache (since the actor started)")
        actors = GaugeMetricFamily(PREFIX + "actors", "actors per scenario, role and state (serving, draining, "
                                   "starting, dead)", labels=["model_name", "scenario", "role", "state"])
        counts: dict[tuple[str, str, str, str], int] = {}
        for scenario, infos in self.actor_infos().items():
            model = self.model_names.get(scenario, "")
            for info in infos:
                state = (model, scenario, info.role.value, info.state.value)
                counts[state] = counts.get(state, 0) + 1
                if info.state in (ActorState.STARTING, ActorState.DEAD):
                    continue  # no load to report: counted by state only
                load = info.load
                key = [model, scenario, info.actor_id, info.role.value]
                running.add_metric(key, max(load.active_requests - load.queued_requests, 0))
                waiting.add_metric(key, load.queued_requests)
                queued_tokens.add_metric(key, load.queued_prompt_tokens)
                usage.add_metric(key, load.used_blocks / load.num_blocks if load.num_blocks else 0.0)
                used.add_metric(key, load.used_blocks)
                total.add_metric(key, load.num_blocks)
                if load.prefix_cache is not None and info.block_size:
                    # the engine counts blocks; vLLM's figures are tokens
                    queries.add_metric(key, load.prefix_cache.queries * info.block_size)
                    hits.add_metric(key, load.prefix_cache.hits * info.block_size)
        for state, n in counts.items():
            actors.add_metric(list(state), n)
        return [running, waiting, queued_tokens, usage, used, total, queries, hits, actors]
