"""The four comparisons of issue 7, each pdmesh's way against one baseline on the same
workload and cluster, with what P/D-Serve (arXiv 2408.08147) reports for it."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from simtests.cluster import Cluster, Variant
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


def _all(run: Run) -> Stats:
    return run.stats()[-1]


COMPARISONS = {
    "pools": Comparison("per-scenario pools + ratio controller", "one mixed pool, static ratio",
                        {"pools": "mixed", "controller": False}, "goodput (req/s per actor)",
                        lambda r: _all(r).goodput, True, "+60% end-to-end throughput"),
    "placement": Comparison("forward on rejection", "central scheduler, queue reports 1 interval stale",
                            {"placement": "central"}, "TTFT attainment",
                            lambda r: _all(r).ttft_attainment, True, "+42% TTFT SLO attainment"),
    "transfer": Comparison("contiguous KV transfer", "block-fixed transfer", {"transfer": "block"},
                           "mean KV transfer time (ms)", lambda r: _all(r).transfer_mean_s * 1e3, False,
                           "-46% transfer time"),
    "serving": Comparison("disaggregated", "aggregated, same actor count", {"serving": "aggregated"},
                          "goodput (req/s per actor)", lambda r: _all(r).goodput, True, "(not reported)"),
}


@dataclass(frozen=True)
class Outcome:
    comparison: Comparison
    pdmesh: Run
    baseline: Run

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
    """Runs pdmesh's variant once and each baseline once, on the same workload."""
    progress("pdmesh")
    ours = Simulator(cluster, variant).run(w)
    outcomes = []
    for name in names:
        c = COMPARISONS[name]
        progress(c.baseline)
        outcomes.append(Outcome(c, ours, Simulator(cluster, replace(variant, **c.change)).run(w)))
    return outcomes
