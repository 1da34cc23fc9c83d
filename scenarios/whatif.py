"""What a prefill:decode split would do for a request trace, predicted with the performance
model before an operator applies it (`pdmesh what-if`).

The trace is cut into windows; in each, the arrival rate and mean lengths give every
role's utilisation at the split (the capacities the ratio controller plans with). A
request meets its TTFT target when prefill keeps up (utilisation below 1) and its own
prefill plus the queueing wait of an M/D/1 queue over the pool fits the target; it meets
TPOT when decode keeps up and a step at the window's batch (Little's law) fits the target.
A window where decode cannot keep up misses TTFT too: a request waits for decode KV before
its prefill starts. Served requests are what the smaller capacity lets through.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scenarios.controller import Observation, RatioController
from scenarios.perf_model import PerfModel
from scenarios.spec import ScenarioSpec


@dataclass(frozen=True)
class Prediction:
    prefill: int
    decode: int
    requests: int
    duration_s: float
    ttft_attainment: float  # share of requests within the TTFT target
    tpot_attainment: float
    slo_attainment: float  # within both
    goal: float  # the share the scenario's SLO asks for
    served_rps: float  # over the trace: what the split carries of what arrives
    output_tokens_per_s: float
    prefill_utilisation_p50: float  # over windows, request-weighted
    prefill_utilisation_max: float
    decode_utilisation_p50: float
    decode_utilisation_max: float
    overloaded_share: float  # of requests, in windows where a role cannot keep up


@dataclass(frozen=True)
class Suggestion:
    """The split the ratio controller plans for the trace's mean load, at a given actor count."""
    prefill: int
    decode: int
    prefill_needed: float
    decode_needed: float


def predict(arrival_s: np.ndarray, prompt: np.ndarray, output: np.ndarray, spec: ScenarioSpec,
            model: PerfModel, prefill: int, decode: int, window_s: float = 60.0) -> Prediction:
    if prefill < 1 or decode < 1:
        raise ValueError(f"a split needs at least one actor of each role, got {prefill}:{decode}")
    controller = RatioController([spec], {spec.name: model})
    slo = spec.slo
    window = np.floor(arrival_s / window_s).astype(np.int64)
    ttft_ok = np.zeros(len(arrival_s), bool)
    tpot_ok = np.zeros(len(arrival_s), bool)
    util_p, util_d, weights, served, tokens = [], [], [], 0.0, 0.0
    overloaded = 0
    for w in np.unique(window):
        rows = np.flatnonzero(window == w)
        rate = len(rows) / window_s
        p_len, o_len = prompt[rows].astype(float), output[rows].astype(float)
        _, cap = controller.need(Observation(spec.name, rate, p_len.mean(), o_len.mean(), None, None, ()))
        prefill_rps, decode_rps = prefill * cap["prefill_rps_per_actor"], decode * cap["decode_rps_per_actor"]
        rho_p, rho_d = rate / prefill_rps, rate / decode_rps
        util_p.append(rho_p)
        util_d.append(rho_d)
        weights.append(len(rows))
        carried = min(rate, prefill_rps, decode_rps)
        served += carried * window_s
        tokens += carried * window_s * o_len.mean()
        if rho_p >= 1 or rho_d >= 1:
            overloaded += len(rows)
            continue  # a queue that grows through the window: its requests miss
        wait = rho_p / (2 * prefill_rps * (1 - rho_p))  # M/D/1 over the pool's service rate
        ttft_ok[rows] = wait + model.prefill_s(p_len, p_len ** 2) <= slo.ttft_s
        batch = max(1.0, rho_d * cap["decode_batch"])
        context = batch * (p_len.mean() + o_len.mean() / 2)
        tpot_ok[rows] = model.decode_step_s(batch, context) <= slo.tpot_s
    n = len(arrival_s)
    duration = max(float(arrival_s[-1] - arrival_s[0]), window_s) if n else window_s
    p50 = lambda xs: float(_weighted_median(np.array(xs), np.array(weights)))  # noqa: E731
    return Prediction(prefill, decode, n, duration, float(ttft_ok.mean()), float(tpot_ok.mean()),
                      float((ttft_ok & tpot_ok).mean()), slo.percentile / 100, served / duration, tokens / duration,
                      p50(util_p), float(max(util_p)), p50(util_d), float(max(util_d)), overloaded / n)


def suggest(prompt: np.ndarray, output: np.ndarray, rate: float, spec: ScenarioSpec, model: PerfModel,
            actors: int) -> Suggestion:
    controller = RatioController([spec], {spec.name: model})
    need, _ = controller.need(Observation(spec.name, rate, float(prompt.mean()), float(output.mean()), None, None,
                                          ()))
    p = min(max(round(actors * need.prefill / need.total), 1), actors - 1) if need.total else actors // 2
    return Suggestion(p, actors - p, need.prefill, need.decode)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return values[order][np.searchsorted(cum, cum[-1] / 2)]
