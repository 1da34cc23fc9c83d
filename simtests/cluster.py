"""The simulated cluster: scenario specs (their initial prefill/decode counts, scaled to a
total actor count), one performance model per scenario, the controller's settings, and
the variant of serving being simulated (what the comparisons change)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from scenarios.autoscale import ScaleSettings
from scenarios.controller import Observation, RatioController, Settings
from scenarios.perf_model import PerfModel, builtin, load_profile
from scenarios.spec import ScenarioSpec, SpecError, load_specs
from simtests.workload import Workload


@dataclass(frozen=True)
class Variant:
    """How the cluster serves; every comparison flips one of these."""
    pools: Literal["scenario", "mixed"] = "scenario"  # a pool per scenario, or one pool for all
    placement: Literal["forward", "central"] = "forward"  # offers with forward on rejection, or stale reports
    transfer: Literal["contiguous", "block"] = "contiguous"  # one op per layer per K/V, or one per block
    serving: Literal["disaggregated", "aggregated"] = "disaggregated"
    # aggregated: prompt tokens per step beside the decode batch; 512 gave the aggregated baseline its
    # best goodput on the Mooncake trace (of 256, 512, 1024, 2048: larger chunks break the TPOT target)
    chunk_tokens: int = 512
    controller: bool = True  # the live ratio controller (per-scenario pools only)
    mixed_prefill: int | None = None  # mixed: prefill actors of the one pool (None: the specs' summed split)
    autoscale: bool = False  # the live autoscaling policy beside it (scenarios.autoscale)
    # prefix caching on prefill actors (workloads with prefix ids): "off", on with offers
    # idle-first as before, or on with offers first to the actors holding the longest prefix
    prefix: Literal["off", "idle-first", "prefix-aware"] = "off"
    report_interval_s: float = 1.0  # central: how often actors report their queues
    admission_timeout_s: float = 5.0  # gateway: how long a request may wait for a prefill actor


@dataclass(frozen=True)
class Cluster:
    specs: list[ScenarioSpec]
    models: dict[str, PerfModel]  # by scenario name
    settings: Settings = field(default_factory=Settings)
    scale: ScaleSettings = field(default_factory=ScaleSettings)  # with Variant.autoscale

    @property
    def actors(self) -> int:
        return sum(s.prefill + s.decode for s in self.specs)


def load_cluster(specs_path: str | Path, profile: str, actors: int | None = None,
                 settings: Settings = Settings(), only: frozenset[str] | None = None) -> Cluster:
    """profile: a built-in profile name or a profile file; the same model serves every scenario;
    only: the names of the file's scenarios to keep (None: all), before any scaling."""
    specs = load_specs(specs_path)
    if only is not None:
        specs = [s for s in specs if s.name in only]
    if actors is not None:
        specs = scaled(specs, actors)
    model = load_profile(profile) if Path(profile).suffix in (".yaml", ".yml", ".json") else builtin(profile)
    # one PerfModel per scenario (live, one per accelerator, refined from the actors' measurements);
    # the autoscaler's budget is the file's fleet (`--compare autoscale`: the fleet sized for the peak)
    return Cluster(specs, {s.name: model for s in specs}, settings,
                   ScaleSettings(budget=sum(s.prefill + s.decode for s in specs)))


def scaled(specs: list[ScenarioSpec], actors: int) -> list[ScenarioSpec]:
    """The specs with their initial counts scaled to `actors` in all (largest remainders), each
    role at least 1 and within its limits: the same split on a cluster of another size."""
    counts = [c for s in specs for c in (s.prefill, s.decode)]
    total = sum(counts)
    if actors < len(counts) or not total:
        raise SpecError(f"--actors {actors}: need at least one actor per role of each scenario ({len(counts)})")
    exact = [c * actors / total for c in counts]
    out = [max(1, int(x)) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: int(exact[i]) - exact[i]):
        if sum(out) >= actors:
            break
        out[i] += 1
    while sum(out) > actors:  # the at-least-one floor overshot: take from the largest
        out[out.index(max(out))] -= 1
    scaled_specs = []
    for k, s in enumerate(specs):
        p, d = out[2 * k], out[2 * k + 1]
        limits = {r: lim.model_copy(update={"min": min(lim.min, n), "max": max(lim.max, n)})
                  for (r, lim), n in zip(s.limits.items(), (p, d))}
        scaled_specs.append(s.model_copy(update={"prefill": p, "decode": d, "limits": limits}))
    return scaled_specs


def provisioned(cluster: Cluster, w: Workload, window_s: float = 60.0) -> Cluster:
    """The cluster re-split for the workload's first `window_s` (`RatioController.initial_split`
    on that window's arrivals and mean lengths): where per-scenario pools start when they were
    provisioned for the load they meet, not for the load the scenario file was written for."""
    return _split_for(cluster, _window(cluster, w, w.arrival_s[0] if len(w) else 0.0, window_s))


def peak_sized(cluster: Cluster, w: Workload, window_s: float | None = None) -> Cluster:
    """A static fleet sized for the workload's peak: as many actors as the busiest `window_s`
    (default: one control interval, what the controller and the autoscaler observe) needs by
    the controller's model, all scenarios together, split for that window; the autoscaler's
    budget is that fleet."""
    peak, need = max(window_needs(cluster, w, window_s or cluster.settings.interval_s), key=lambda x: x[1])
    total = max(math.ceil(need), 2 * len(cluster.specs))
    specs = [s.model_copy(update={"prefill": 1, "decode": 1}) for s in cluster.specs]
    specs[0] = specs[0].model_copy(update={"prefill": total - 2 * len(specs) + 1})  # only the total counts here
    return replace(_split_for(replace(cluster, specs=specs), peak), scale=replace(cluster.scale, budget=total))


def window_needs(cluster: Cluster, w: Workload, window_s: float) -> list[tuple[list[Observation], float]]:
    """Each `window_s` of the workload from its first arrival: the scenarios' load in it, as the
    controller observes it, and the actors that load needs by the controller's model, all
    scenarios together."""
    controller = RatioController(cluster.specs, cluster.models, cluster.settings)
    start = w.arrival_s[0] if len(w) else 0.0
    windows = [_window(cluster, w, start + k * window_s, window_s)
               for k in range(max(1, math.ceil(w.duration_s / window_s)))]
    return [(obs, sum(controller.need(o)[0].total for o in obs)) for obs in windows]


def _window(cluster: Cluster, w: Workload, start: float, window_s: float) -> list[Observation]:
    """Each scenario's load in [start, start + window_s), as the controller observes it."""
    inside = (w.arrival_s >= start) & (w.arrival_s < start + window_s)
    observations = []
    for k, spec in enumerate(cluster.specs):
        mine = inside & (w.scenario == k)
        n = int(mine.sum())
        observations.append(Observation(spec.name, n / window_s, float(np.mean(w.prompt[mine])) if n else 0.0,
                                        float(np.mean(w.output[mine])) if n else 0.0, None, None, ()))
    return observations


def _split_for(cluster: Cluster, observations: list[Observation]) -> Cluster:
    split = RatioController(cluster.specs, cluster.models, cluster.settings).initial_split(observations)
    specs = []
    for s in cluster.specs:
        p, d = split[s.name]
        limits = {r: lim.model_copy(update={"min": min(lim.min, n), "max": max(lim.max, n)})
                  for (r, lim), n in zip(s.limits.items(), (p, d))}
        specs.append(s.model_copy(update={"prefill": p, "decode": d, "limits": limits}))
    return replace(cluster, specs=specs)
