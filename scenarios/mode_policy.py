"""When the controller moves a scenario between serving modes (mesh.placement).

Only scenarios whose spec says `mode: auto` move: between auto (prefill and decode actors,
short prompts prefilled locally) and aggregated (every actor runs whole requests). One
aggregated actor does the work of a prefill and a decode actor in one pass, with no KV
transfer and no lease held through a prefill: while the load is light it serves as well or
better. Under load its prefills slow its decodes (TPOT), and a split pool carries more.

  auto -> aggregated: the load would keep the pool aggregated at most `low` busy (by the
                      performance model), and the scenario meets its SLOs;
  aggregated -> auto: above `high`, or TPOT misses its goal (prefill interference); the
                      pool needs two actors or more.

Hysteresis: `low` < `high` (a dead band), `confirm` intervals in a row asking for the move,
and `min_dwell_s` since the scenario's last switch. The split a switch goes to is the one
the model balances (the ratio controller refines it from there); an aggregated scenario has
no prefill:decode ratio, so the ratio controller leaves it alone (`ratio_controlled`).

A plain policy: observations and the clock in, decisions (with inputs and reason) out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.placement import Mode
from scenarios.controller import Observation
from scenarios.perf_model import PerfModel
from scenarios.spec import ScenarioSpec


@dataclass(frozen=True)
class ModeSettings:
    low: float = 0.4  # aggregate at or below this utilisation of the pool aggregated
    high: float = 0.8  # split at or above it
    confirm: int = 2  # intervals in a row that must ask for the same switch
    min_dwell_s: float = 60.0  # since the scenario's last switch


@dataclass(frozen=True)
class ModeDecision:
    time: float
    scenario: str
    current: Mode
    target: Mode
    prefill: int  # prefill actors after a split (the rest decode); 0 when aggregating
    inputs: dict
    reason: str


@dataclass
class _Memory:
    mode: Mode
    streak: int = 0
    last_change: float = -math.inf


class ModePolicy:
    def __init__(self, specs: list[ScenarioSpec], models: dict[str, PerfModel],
                 settings: ModeSettings = ModeSettings()):
        if not 0 < settings.low < settings.high:
            raise ValueError(f"mode thresholds must satisfy 0 < low < high, got {settings.low} and {settings.high}")
        self.specs = {s.name: s for s in specs}
        self.models, self.settings = models, settings
        self._memory = {s.name: _Memory(s.mode) for s in specs}

    def mode(self, scenario: str) -> Mode:
        """The mode the scenario serves in now, as this policy last set it."""
        return self._memory[scenario].mode

    def ratio_controlled(self, scenario: str) -> bool:
        """Whether the ratio controller steers the scenario: an aggregated one has no ratio."""
        return self.mode(scenario) is not Mode.AGGREGATED

    def step(self, observations: list[Observation], now: float) -> list[ModeDecision]:
        """One interval: the switches to make (each already taken as the scenario's mode)."""
        decisions = []
        for obs in observations:
            if self.specs[obs.scenario].mode is Mode.AUTO:
                decision = self._decide(obs, now)
                if decision:
                    decisions.append(decision)
        return decisions

    def _decide(self, obs: Observation, now: float) -> ModeDecision | None:
        spec, s, mem = self.specs[obs.scenario], self.settings, self._memory[obs.scenario]
        n = len(obs.actors)
        per_actor, prefill_share = self._aggregated_rps(obs)
        load = obs.arrival_rps / max(n * per_actor, 1e-9)
        goal = spec.slo.percentile / 100
        tpot_short = obs.tpot_attainment is not None and obs.tpot_attainment < goal
        meets = not tpot_short and (obs.ttft_attainment is None or obs.ttft_attainment >= goal)
        figures = f"load {load:.2f} of the pool aggregated ({obs.arrival_rps:.2f}/s, {n} actors)"
        if mem.mode is Mode.AGGREGATED:
            why = (f"{figures} at or above {s.high:g}" if load >= s.high else
                   "TPOT misses its goal: prefills slow the decodes" if tpot_short else None)
            target = Mode.AUTO if why and n >= 2 else None
        else:
            target = Mode.AGGREGATED if load <= s.low and meets else None
            why = f"{figures} at or below {s.low:g}, SLOs met" if target else None
        if target is None:
            mem.streak = 0
            return None
        mem.streak += 1
        if mem.streak < s.confirm or now - mem.last_change < s.min_dwell_s:
            return None
        prefill = 0 if target is Mode.AGGREGATED else min(max(round(n * prefill_share), 1), n - 1)
        current, mem.mode, mem.streak, mem.last_change = mem.mode, target, 0, now
        split = f": {prefill}P:{n - prefill}D" if prefill else ""
        return ModeDecision(now, obs.scenario, current, target, prefill,
                            {"arrival_rps": obs.arrival_rps, "mean_prompt": obs.mean_prompt,
                             "mean_output": obs.mean_output, "ttft_attainment": obs.ttft_attainment,
                             "tpot_attainment": obs.tpot_attainment, "actors": n, "load": load},
                            f"{why}: {current} -> {target}{split}")

    def _aggregated_rps(self, obs: Observation) -> tuple[float, float]:
        """Requests/s one aggregated actor carries (its prefills and decodes take turns), and the
        share of that time spent prefilling: the split that balances the two roles."""
        cap = self.models[obs.scenario].capacity(obs.mean_prompt, obs.mean_output, self.specs[obs.scenario].slo.tpot_s)
        prefill_s, decode_s = 1 / max(cap.prefill_rps, 1e-9), 1 / max(cap.decode_rps, 1e-9)
        return 1 / (prefill_s + decode_s), prefill_s / (prefill_s + decode_s)
