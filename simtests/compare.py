"""The comparisons: the four of issue 7, each pdmesh's way against one baseline on the same
workload and cluster, with what P/D-Serve (arXiv 2408.08147) reports for it, and issue 9's
prefix-aware forwarding against idle-first, both with prefix caches, and issue 20's
autoscaling against a static fleet."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from simtests.cluster import Cluster, Variant, peak_sized, provisioned, window_needs
from simtests.results import Run, Stats
from simtests.sim import Simulator
from simtests.workload import Workload


@dataclass(frozen=True)
class Comparison:
    name: str
    baseline: str  # what the other side does
    change: dict  # the baseline's Variant fields, against pdmesh's
    metric: str
    value: Callable[[Run], float]
    higher_is_better: bool
    paper: str
    fmt: str = "{:.3f}"
    ours: dict = field(default_factory=dict)  # pdmesh's Variant fields, where the default run is not it
    search: str | None = None  # a Variant field the baseline is tuned over (its best value is compared)
    peak: bool = False  # both sides on a fleet sized for the workload's peak (`cluster.peak_sized`)
    # what no policy does better than on this load, in words: the figure a miss is measured against
    bound: Callable[["Outcome", Cluster, Workload], str] | None = None


def _all(run: Run) -> Stats:
    return run.stats()[-1]


def within_slo(run: Run) -> float:
    """Goodput (req/s per actor) were every request within both targets: what no split or
    policy exceeds with this load on this fleet."""
    return len(run.state) / run.span_s / run.actors


def ideal_fleet(cluster: Cluster, w: Workload, window_s: float) -> tuple[float, list[float]]:
    """A fleet that held exactly each window's need (by the controller's model, no start-up):
    its actor-hours as a share of the peak need's (the mean need over the peak; 1 when nothing is
    needed), and the needs."""
    needs = [need for _, need in window_needs(cluster, w, window_s)]
    return (float(np.mean(needs)) / max(needs) if max(needs) > 0 else 1.0), needs


def _slo_bound(o: "Outcome", cluster: Cluster, w: Workload) -> str:
    ceiling, theirs = within_slo(o.pdmesh), o.values[1]
    over = f", {ceiling / theirs - 1:+.1%} over the baseline" if theirs else ""
    return f"every request within SLO is {ceiling:.4g} req/s per actor{over}"


def _fleet_bound(o: "Outcome", cluster: Cluster, w: Workload) -> str:
    shares = []
    for window_s in (cluster.settings.interval_s, 60.0):  # what the controller observes; an actor's start-up
        share, needs = ideal_fleet(cluster, w, window_s)
        shares.append(f"{share:.0%} with {window_s:g} s windows (need {min(needs):.1f} to {max(needs):.1f} "
                      f"actors, median {float(np.median(needs)):.1f})")
    return ("a fleet that held each window's need (controller's model, no start-up) would hold, of the peak "
            "need's actor-hours, " + "; ".join(shares))


COMPARISONS = {
    # the baseline is the mixed pool at its best static split for this load (`best_static`)
    "pools": Comparison("per-scenario pools + ratio controller", "one mixed pool, best static ratio",
                        {"pools": "mixed", "controller": False}, "goodput (req/s per actor)",
                        lambda r: _all(r).goodput, True, "+60% end-to-end throughput", search="mixed_prefill",
                        bound=_slo_bound),
    "placement": Comparison("forward on rejection", "central scheduler, queue reports 1 interval stale",
                            {"placement": "central"}, "TTFT attainment",
                            lambda r: _all(r).ttft_attainment, True, "+42% TTFT SLO attainment", "{:.1%}"),
    "transfer": Comparison("contiguous KV transfer", "block-fixed transfer", {"transfer": "block"},
                           "mean KV transfer time (ms)", lambda r: _all(r).transfer_mean_s * 1e3, False,
                           "-46% transfer time", "{:.1f}"),
    "serving": Comparison("disaggregated", "aggregated, same actor count", {"serving": "aggregated"},
                          "goodput (req/s per actor)", lambda r: _all(r).goodput, True, "(not reported)"),
    "prefix": Comparison("prefix-aware forwarding", "idle-first forwarding, prefix caches on",
                         {"prefix": "idle-first"}, "TTFT p50 (s)", lambda r: _all(r).ttft_p50_s, False,
                         "(Dynamo, SGLang: route by prefix)", "{:.2f}", {"prefix": "prefix-aware"}),
    # issue 20: the autoscaling policy beside the controller against the fleet it starts from
    # (the scenario file's counts, sized for the peak), on SLO attainment and on actor-hours
    "autoscale": Comparison("autoscaling", "static fleet sized for the peak", {"autoscale": False},
                            "SLO attainment", lambda r: _all(r).slo_attainment, True,
                            "(target: at or above the static fleet)", "{:.1%}", {"autoscale": True}, peak=True),
    "actor-hours": Comparison("autoscaling", "static fleet sized for the peak", {"autoscale": False},
                              "actor-hours", lambda r: r.actor_hours, False, "(target: at most 70%)", "{:.1f}",
                              {"autoscale": True}, peak=True, bound=_fleet_bound),
}


@dataclass(frozen=True)
class Outcome:
    comparison: Comparison
    pdmesh: Run
    baseline: Run
    note: str = ""  # how the baseline was chosen, where it was searched
    bound: str = ""  # the comparison's bound on this load (`Comparison.bound`), where it has one

    @property
    def values(self) -> tuple[float, float]:
        return self.comparison.value(self.pdmesh), self.comparison.value(self.baseline)

    @property
    def change(self) -> float:
        """pdmesh against the baseline, as a fraction (+0.6: 60% more)."""
        ours, theirs = self.values
        return ours / theirs - 1 if theirs else float("inf")


def compare(names: list[str], cluster: Cluster, w: Workload, variant: Variant = Variant(),
            progress: Callable[[str], None] = lambda _: None) -> list[Outcome]:
    """Runs each distinct variant once, on the same workload: pdmesh's side is shared. The
    cluster starts provisioned for the workload's first minute (`cluster.provisioned`), or sized
    for its peak where the comparison is of fleets (`cluster.peak_sized`)."""
    clusters = {False: provisioned(cluster, w), True: peak_sized(cluster, w)}
    runs: dict[tuple[bool, Variant], Run] = {}

    def run(v: Variant, label: str) -> Run:
        if (peak, v) not in runs:
            progress(label)
            runs[peak, v] = Simulator(clusters[peak], v).run(w)
        return runs[peak, v]

    outcomes = []
    for name in names:
        c = COMPARISONS[name]
        peak, cluster = c.peak, clusters[c.peak]
        ours = replace(variant, **c.ours)
        mine = run(ours, f"pdmesh ({c.name})" if c.ours else "pdmesh")
        base = replace(ours, **c.change)
        if c.search:
            best = best_static(lambda p: c.value(run(replace(base, **{c.search: p}), f"{c.baseline}: {p}P")),
                               cluster.actors, c.higher_is_better)
            split = f"{best}P:{cluster.actors - best}D"
            outcome = Outcome(c, mine, run(replace(base, **{c.search: best}), ""),
                              f" ({split}, best of {sum(getattr(v, c.search) is not None for _, v in runs)})")
        else:
            outcome = Outcome(c, mine, run(base, c.baseline))
        outcomes.append(replace(outcome, bound=c.bound(outcome, cluster, w)) if c.bound else outcome)
    return outcomes


def best_static(score: Callable[[int], float], actors: int, higher_is_better: bool = True) -> int:
    """The prefill count in [1, actors - 1] with the best score: a grid of about eight, then a
    pattern search from the best of them (the score is about unimodal in the split)."""
    sign = 1 if higher_is_better else -1
    seen: dict[int, float] = {}

    def value(p: int) -> float:
        if p not in seen:
            seen[p] = sign * score(p)
        return seen[p]

    step = max(1, actors // 8)
    best = max(range(step, actors, step) or [1], key=value)
    while True:  # a pattern search: move while a neighbour `step` away is better, then halve the step
        nxt = max((p for p in (best - step, best, best + step) if 1 <= p < actors), key=value)
        if nxt != best:
            best = nxt
        elif step == 1:
            return best
        else:
            step //= 2
