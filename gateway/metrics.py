"""Prometheus metrics on /metrics: request outcomes and latencies from the gateway's own
measurements, and the actors' load (queues, KV blocks, roles) read from their last reports."""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from mesh import ActorReport, ActorState, Event

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, actor_infos: Callable[[], dict[str, list[ActorReport]]], scenarios: Iterable[str] = ()):
        """actor_infos() -> {scenario: [actor info, ...]} as last refreshed; scenarios: the names
        whose event counters start at 0, so that rate() and increase() answer before the first event."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pdmesh_requests", "requests finished, by scenario and outcome",
                                ["scenario", "outcome"], registry=r)
        self.in_flight = Gauge("pdmesh_requests_in_flight", "requests being served", ["scenario"], registry=r)
        self.ttft = Histogram("pdmesh_ttft_seconds", "time to first token, as the gateway sees it",
                              ["scenario"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pdmesh_tpot_seconds", "time per output token after the first",
                              ["scenario"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pdmesh_e2e_seconds", "request latency, end to end", ["scenario"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.rejections = Counter("pdmesh_prefill_rejections", "prefill offers rejected", ["scenario"], registry=r)
        self.forwards = Counter("pdmesh_forwards", "requests admitted after one or more rejections, "
                                "counted per forward", ["scenario"], registry=r)
        # path: direct (device or host memory on the wire as it is) or staged (through host buffers)
        self.kv_bytes = Counter("pdmesh_kv_transfer_bytes", "KV cache bytes moved prefill -> decode",
                                ["scenario", "backend", "path"], registry=r)
        self.kv_seconds = Histogram("pdmesh_kv_transfer_seconds", "KV transfer time per request",
                                    ["scenario", "backend", "path"], buckets=LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("pdmesh_controller_decisions", "ratio controller actions, by the scenario the "
                                 "actor was in, the action (flip, lend) and the role it serves afterwards",
                                 ["scenario", "action", "role"], registry=r)
        self.placements = Counter("pdmesh_placements", "auto mode: requests prefilled on the decode actor (local) "
                                  "or sent to a prefill actor (remote), by the conditional policy",
                                  ["scenario", "decision"], registry=r)
        for name in scenarios:
            self.rejections.labels(name)
            self.forwards.labels(name)
            for action in ("flip", "lend"):
                for role in ("prefill", "decode"):
                    self.decisions.labels(name, action, role)
        r.register(_ActorCollector(actor_infos))

    def record_events(self, scenario: str, events: list[Event]) -> None:
        for e in events:
            if e.name == "prefill_rejected":
                self.rejections.labels(scenario).inc()
            elif e.name == "prefill_accepted" and e.attributes.get("forwards"):
                self.forwards.labels(scenario).inc(e.attributes["forwards"])
            elif e.name == "placement":
                self.placements.labels(scenario, e.attributes["decision"]).inc()
            elif e.name == "kv_transfer":
                labels = (scenario, e.attributes.get("backend", ""), e.attributes.get("path", ""))
                self.kv_bytes.labels(*labels).inc(e.attributes.get("bytes", 0))
                self.kv_seconds.labels(*labels).observe(e.attributes.get("duration_s", 0.0))

    def expose(self) -> bytes:
        return generate_latest(self.registry)


class _ActorCollector:
    """Gauges computed at scrape time from the actors' last load reports."""

    def __init__(self, actor_infos: Callable[[], dict[str, list[ActorReport]]]):
        self.actor_infos = actor_infos

    def collect(self):
        labels = ["scenario", "actor", "role"]
        queue = GaugeMetricFamily("pdmesh_queue_depth", "requests queued for prefill on an actor", labels=labels)
        queued_tokens = GaugeMetricFamily("pdmesh_queued_prompt_tokens", "prompt tokens queued on an actor",
                                          labels=labels)
        used = GaugeMetricFamily("pdmesh_kv_blocks_used", "KV blocks in use on an actor", labels=labels)
        total = GaugeMetricFamily("pdmesh_kv_blocks", "KV blocks on an actor", labels=labels)
        actors = GaugeMetricFamily("pdmesh_actors", "actors per scenario, role and state (serving, draining, "
                                   "starting, dead)",
                                   labels=["scenario", "role", "state"])
        counts: dict[tuple[str, str, str], int] = {}
        for scenario, infos in self.actor_infos().items():
            for info in infos:
                state = (scenario, info.role.value, info.state.value)
                counts[state] = counts.get(state, 0) + 1
                if info.state in (ActorState.STARTING, ActorState.DEAD):
                    continue  # no load to report: counted by state only
                load = info.load
                key = [scenario, info.actor_id, info.role.value]
                queue.add_metric(key, load.queued_requests)
                queued_tokens.add_metric(key, load.queued_prompt_tokens)
                used.add_metric(key, load.used_blocks)
                total.add_metric(key, load.num_blocks)
        for state, n in counts.items():
            actors.add_metric(list(state), n)
        return [queue, queued_tokens, used, total, actors]
