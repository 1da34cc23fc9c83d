"""The comparisons: the four of issue 7, each pdmesh's way against one baseline on the same
workload and cluster, with what P/D-Serve (arXiv 2408.08147) reports for it, and issue 9's
prefix-aware forwarding against idle-first, both with prefix caches, and issue 20's
autoscaling against a static fleet."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from simtests.cluster import Cluster, Variant, peak_sized, provisioned
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


def _all(run: Run) -> Stats:
    return run.stats()[-1]


COMPARISONS = {
    # the baseline is the mixed pool at its best static split for this load (`best_static`)
    "pools": Comparison("per-scenario pools + ratio controller", "one mixed pool, best static ratio",
                        {"pools": "mixed", "controller": False}, "goodput (req/s per actor)",
                        lambda r: _all(r).goodput, True, "+60% end-to-end throughput", search="mixed_prefill"),
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
                              {"autoscale": True}, peak=True),
}


@dataclass(frozen=True)
class Outcome:
    comparison: Comparison
    pdmesh: Run
    baseline: Run
    note: str = ""  # how the baseline was chosen, where it was searched

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
            outcomes.append(Outcome(c, mine, run(replace(base, **{c.search: best}), ""),
                                    f" ({split}, best of {sum(getattr(v, c.search) is not None for _, v in runs)})"))
        else:
            outcomes.append(Outcome(c, mine, run(base, c.baseline)))
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
