"""How fast the ratio controller recovers from a deliberately bad split: the same load from
the scenario file's split (the reference) and from that split turned upside down (each
scenario's prefill and decode counts swapped), both under the controller, on the same
arrivals. Convergence is the first time from which the bad start's goodput stays within a
tolerance of the reference's in every window: window by window, so that the load's own swings
(a tide, a burst, Poisson noise) count the same on both sides.

Goodput per window: requests that ended in the window within both SLOs, per second per actor.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from simtests.cluster import Cluster
from simtests.results import Run
from simtests.sim import Simulator
from simtests.workload import Workload


@dataclass(frozen=True)
class Convergence:
    window_s: float
    tolerance: float
    reference: float  # the reference's mean goodput (req/s per actor)
    reference_series: tuple[float, ...]  # goodput per window, from the scenario file's split
    bad_series: tuple[float, ...]  # from the swapped split
    bad_split: dict[str, tuple[int, int]]  # scenario -> the prefill, decode it started from
    converged_s: float | None  # None: not within the tolerance to the end of the load
    actions: dict[str, int]  # the controller's, from the bad start


def swapped(cluster: Cluster) -> Cluster:
    """Each scenario starts with its prefill and decode counts swapped, its limits widened to allow it."""
    specs = []
    for s in cluster.specs:
        p, d = s.decode, s.prefill
        limits = {r: lim.model_copy(update={"min": min(lim.min, n), "max": max(lim.max, n)})
                  for (r, lim), n in zip(s.limits.items(), (p, d))}
        specs.append(s.model_copy(update={"prefill": p, "decode": d, "limits": limits}))
    return replace(cluster, specs=specs)


def per_window(times: np.ndarray, window_s: float, until_s: float) -> np.ndarray:
    """Events per second in each whole window of `window_s` within [0, until_s)."""
    edges = np.arange(int(until_s // window_s) + 1) * window_s
    counts, _ = np.histogram(times, bins=edges)
    return counts / window_s


def goodput_series(run: Run, window_s: float, until_s: float) -> np.ndarray:
    good = run.ttft_ok & run.tpot_ok
    return per_window(run.done_at[good], window_s, until_s) / run.actors


def converged_window(reference: np.ndarray, series: np.ndarray, tolerance: float) -> int | None:
    """The first window from which `series` stays within `tolerance` below `reference` in
    every later window; None: not by the last one. Windows are paired by index."""
    ok = np.asarray(series) >= (1 - tolerance) * np.asarray(reference)
    tail_ok = np.logical_and.accumulate(ok[::-1])[::-1]
    return int(np.argmax(tail_ok)) if tail_ok.any() else None


def converge(cluster: Cluster, w: Workload, window_s: float = 60.0, tolerance: float = 0.1) -> Convergence:
    until = w.duration_s
    ref_run = Simulator(cluster).run(w)
    bad = swapped(cluster)
    bad_run = Simulator(bad).run(w)
    ref, series = goodput_series(ref_run, window_s, until), goodput_series(bad_run, window_s, until)
    first = converged_window(ref, series, tolerance)
    return Convergence(window_s, tolerance, float(ref.mean()), tuple(map(float, ref)), tuple(map(float, series)),
                       {s.name: (s.prefill, s.decode) for s in bad.specs},
                       None if first is None else first * window_s, dict(bad_run.actions))
