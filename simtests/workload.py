"""What the simulator replays: arrivals with prompt and output lengths, each tagged with
its scenario. From a trace (rows classified by the scenarios' own match rules) or
synthetic: Poisson, tidal (day/night rate) and bursty (on/off) mixes of scenarios.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from scenarios.classify import Classifier, NoScenario, RequestInfo
from scenarios.spec import ScenarioSpec
from simtests.traces import Trace, TraceError


@dataclass(frozen=True)
class Workload:
    arrival_s: np.ndarray  # float64, sorted
    prompt: np.ndarray  # int64
    output: np.ndarray  # int64
    scenario: np.ndarray  # int: index into the scenario list
    source: str  # what it came from, for reports
    prefix_ids: Callable[[int], list[int]] | None = None  # request -> its prompt's prefix block ids
    block_tokens: int = 512  # tokens per prefix block (Mooncake's hash_ids)

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0


def classify(trace: Trace, specs: list[ScenarioSpec]) -> np.ndarray:
    """Each row's scenario index by the specs' match rules (tags from BurstGPT's model and log
    type, the prompt length); call before `traces.repeat` so each distinct row is classified once."""
    classifier = Classifier(specs)
    index = {s.name: i for i, s in enumerate(specs)}
    out = np.empty(len(trace), dtype=np.int64)
    for i, prompt in enumerate(trace.prompt.tolist()):
        info = RequestInfo(prompt, tags=trace.tags[i] if trace.tags else ())
        try:
            out[i] = index[classifier.classify(info)]
        except NoScenario as e:
            raise TraceError(f"trace row {i + 1}: {e}; add a scenario whose match rules cover it") from None
    return out


def from_trace(trace: Trace, source: str) -> Workload:
    if trace.scenario is None:
        raise TraceError("classify the trace's rows into scenarios first (workload.classify)")
    return Workload(trace.arrival_s, trace.prompt, trace.output, trace.scenario, source,
                    trace.prefix_ids if trace.hash_ids else None)


@dataclass(frozen=True)
class Mix:
    """One scenario's share of a synthetic load, with fixed or exponentially spread lengths."""
    scenario: int
    rate_rps: float
    prompt: int
    output: int
    spread: bool = True  # exponential lengths around the means; False: every request alike


def synthetic(mixes: list[Mix], duration_s: float, shape: str = "poisson", seed: int = 0,
              period_s: float = 600.0, low: float = 0.2) -> Workload:
    """Non-homogeneous Poisson arrivals by thinning. shape: "poisson" (flat), "tidal" (rate swings
    between `low` x and 1 x the mix rate over `period_s`, scenarios out of phase: day and night
    traffic), "bursty" (on for a tenth of each period at 5 x, else `low` x)."""
    rng = np.random.default_rng(seed)
    parts = []
    for k, m in enumerate(mixes):
        peak = m.rate_rps * (5.0 if shape == "bursty" else 1.0)
        n = rng.poisson(peak * duration_s)
        t = np.sort(rng.uniform(0.0, duration_s, n))
        phase = 2 * np.pi * (t / period_s + k / max(len(mixes), 1))
        if shape == "poisson":
            keep = np.ones(n, dtype=bool)
        elif shape == "tidal":
            keep = rng.uniform(size=n) < low + (1 - low) * (0.5 + 0.5 * np.sin(phase))
        elif shape == "bursty":
            on = (t / period_s + k / max(len(mixes), 1)) % 1.0 < 0.1
            keep = on | (rng.uniform(size=n) < low / 5.0)
        else:
            raise ValueError(f"unknown shape {shape!r}; expected poisson, tidal or bursty")
        t = t[keep]
        lengths = [np.maximum(1, rng.exponential(mean, len(t)).round()).astype(np.int64) if m.spread
                   else np.full(len(t), mean, dtype=np.int64) for mean in (m.prompt, m.output)]
        parts.append((t, *lengths, np.full(len(t), m.scenario, dtype=np.int64)))
    t, p, o, s = (np.concatenate(col) for col in zip(*parts))
    order = np.argsort(t, kind="stable")
    return Workload(t[order], p[order], o[order], s[order], f"synthetic {shape}, {len(t)} requests")
