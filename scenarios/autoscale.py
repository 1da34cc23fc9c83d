"""Fleet autoscaling per scenario: how many actors each scenario should have, within its role
limits and an optional cluster budget, from its forecast arrivals.

A policy like the ratio controller (and on the same observations, capacity model and role
rule): every interval it forecasts each scenario's arrivals one start-up time ahead (Holt's
linear trend, as Dynamo's SLA planner forecasts load), asks the controller what that load
needs (`RatioController.need`, with its SLO-attainment boosts), and
- adds actors at once when the forecast needs more than it has (an actor takes a start-up
  time to serve, so waiting would miss the SLOs), to the role short the most;
- removes one actor (by drain) only when, over the last `idle_intervals` intervals, even the
  largest need was below what it would have left minus the band: a fleet sized for the peaks of noisy
  load keeps them, so noise never removes what the next interval adds back.
Scale-outs compete for the budget by priority, then by shortfall. What carries the actions
out (Ray's autoscaler and pools live, modelled actors in the simulator) is a connector's job.
"""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Literal

from mesh.role_limits import Change
from mesh.roles import MOVABLE, Role
from scenarios.controller import Observation, RatioController, least_loaded, pool_roles


@dataclass(frozen=True)
class ScaleSettings:
    budget: int | None = None  # actors in all, over every scenario; None: no cluster limit
    start_s: float = 60.0  # how long a new actor takes to serve: the forecast horizon
    level: float = 0.5  # Holt's smoothing of the level...
    trend: float = 0.3  # ...and of the trend
    band: float = 1.0  # actors of slack before scaling in
    idle_intervals: int = 6  # intervals whose largest need decides a scale-in


@dataclass(frozen=True)
class ScaleAction:
    kind: Literal["add", "remove"]
    scenario: str
    role: Role
    actor_id: str | None = None  # remove: the one to drain and stop


@dataclass(frozen=True)
class ScaleDecision:
    time: float
    scenario: str
    actions: tuple[ScaleAction, ...]
    current: int  # actors before
    target: int
    forecast_rps: float
    reason: str


@dataclass
class _Trend:
    level: float | None = None
    slope: float = 0.0  # per interval
    needs: deque = field(default_factory=deque)  # actors needed, over the last idle_intervals


class Autoscaler:
    def __init__(self, controller: RatioController, settings: ScaleSettings = ScaleSettings()):
        self.controller, self.settings = controller, settings
        self._trend: dict[str, _Trend] = {name: _Trend() for name in controller.specs}

    def forecast(self, obs: Observation) -> float:
        """Arrivals/s one start-up time ahead; updates the scenario's level and trend."""
        s, t = self.settings, self._trend[obs.scenario]
        if t.level is None:
            t.level = obs.arrival_rps
        else:
            previous = t.level
            t.level = s.level * obs.arrival_rps + (1 - s.level) * (t.level + t.slope)
            t.slope = s.trend * (t.level - previous) + (1 - s.trend) * t.slope
        ahead = s.start_s / self.controller.settings.interval_s
        return max(0.0, t.level + max(t.slope, 0.0) * ahead)  # a falling trend scales in by idling, not ahead

    def step(self, observations: list[Observation], now: float) -> list[ScaleDecision]:
        s = self.settings
        total = sum(len(o.actors) for o in observations)
        plans = []
        for o in observations:
            rps = self.forecast(o)
            need, _ = self.controller.need(replace(o, arrival_rps=rps))
            plans.append((o, rps, need))
        decisions = []
        # scale out: priority first, then the largest shortfall
        for o, rps, need in sorted(plans, key=lambda p: (-self.controller.specs[p[0].scenario].priority,
                                                         len(p[0].actors) - p[2].total)):
            short = math.ceil(need.total - len(o.actors) - 1e-9)
            room = short if s.budget is None else min(short, s.budget - total)
            if room > 0:
                d = self._add(o, need, room, rps, now)
                if d:
                    total += len(d.actions)
                    decisions.append(d)
        scaled = {d.scenario for d in decisions}
        for o, rps, need in plans:
            needs = self._trend[o.scenario].needs
            needs.append(need.total)
            while len(needs) > s.idle_intervals:
                needs.popleft()
            if o.scenario in scaled:
                needs.clear()
            elif len(needs) == s.idle_intervals and max(needs) < len(o.actors) - 1 - s.band:
                needs.clear()
                d = self._remove(o, need, rps, now)
                if d:
                    decisions.append(d)
        return decisions

    def _add(self, o: Observation, need, n: int, rps: float, now: float) -> ScaleDecision | None:
        spec = self.controller.specs[o.scenario]
        counts = Counter(a.role for a in o.actors)
        rules, actions = pool_roles(spec, o.actors), []
        for _ in range(n):
            deficit = {Role.PREFILL: need.prefill - counts[Role.PREFILL], Role.DECODE: need.decode - counts[Role.DECODE]}
            role = next((r for r in sorted(MOVABLE, key=deficit.get, reverse=True)
                         if rules.judge(Change("new", None, r)).allowed), None)
            if role is None:
                break  # every role at its max
            rules = rules.after(Change("new", None, role))
            counts[role] += 1
            actions.append(ScaleAction("add", o.scenario, role))
        if not actions:
            return None
        roles = Counter(a.role for a in actions)
        return ScaleDecision(now, o.scenario, tuple(actions), len(o.actors), len(o.actors) + len(actions), rps,
                             f"forecast {rps:.2f} req/s in {self.settings.start_s:.0f} s needs {need.total:.1f} "
                             f"actors, has {len(o.actors)}: add " + ", ".join(f"{n} {r}" for r, n in roles.items()))

    def _remove(self, o: Observation, need, rps: float, now: float) -> ScaleDecision | None:
        spec = self.controller.specs[o.scenario]
        counts = Counter(a.role for a in o.actors)
        surplus = {Role.PREFILL: counts[Role.PREFILL] - need.prefill, Role.DECODE: counts[Role.DECODE] - need.decode}
        rules = pool_roles(spec, o.actors)
        for role in sorted(MOVABLE, key=surplus.get, reverse=True):
            a = next((a for a in least_loaded(o.actors, role) if rules.judge(Change(a.actor_id, role, None)).allowed),
                     None)
            if a is not None:
                return ScaleDecision(now, o.scenario, (ScaleAction("remove", o.scenario, role, a.actor_id),),
                                     len(o.actors), len(o.actors) - 1, rps,
                                     f"needed under {len(o.actors) - 1 - self.settings.band:.0f} of {len(o.actors)} actors for "
                                     f"{self.settings.idle_intervals} intervals: drain and stop {a.actor_id} ({role})")
        return None
