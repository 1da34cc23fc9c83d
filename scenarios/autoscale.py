"""Fleet autoscaling per scenario: how many actors each scenario should have, within its role
limits and an optional cluster budget, from its forecast arrivals.

A policy like the ratio controller (and on the same observations, capacity model and role
rule): every interval it forecasts each scenario's arrivals one start-up time ahead (Holt's
linear trend, as Dynamo's SLA planner forecasts load; where the arrivals repeat with a period,
found by autocorrelation over the history once it repeated, beyond what noise gives, instead
the largest rate one period ago over the horizon, and no less than now: a daily tide or a
recurring burst is met before it starts, and a burst's steep rise is not extrapolated), asks
the controller what that load needs (`RatioController.need`, with its SLO-attainment boosts),
and
- adds actors at once when the forecast needs more than it has (an actor takes a start-up
  time to serve, so waiting would miss the SLOs), to the role short the most;
- removes actors (by drain) only when, over the last `idle_intervals` intervals, even the
  largest need was below what it has minus the band: then every actor beyond that need and
  the band at once. A fleet sized for the peaks of noisy load keeps them, so noise never
  removes what the next interval adds back.
- plans on the model's need times a scenario's correction: an interval whose SLO misses are
  more than chance gives at the goal over its requests raises it, every other interval with
  answers lowers it back toward 1. The model plans a window's prompts at their mean, and
  long-tailed prompts take more prefill and hold decode KV longer than that; the controller's
  boost for misses lasts one interval, less than a start-up, and this outlasts it, so that the
  actors are there when the misses would come back.
- keeps, until a scenario's arrivals show a period, the largest need of its last `reserve`
  intervals as a reserve of the fleet's: a burst seen once may come again (or another
  scenario's may come) sooner than a start-up time, and the controller lends the reserve to
  whichever scenario it comes to. Once the period shows, the forecast covers the pattern.
Scale-outs compete for the budget by priority, then by shortfall. Its last forecast, where it
comes from a period (`expected`), is what the controller plans its lends on, so that actors
scaled out ahead of a burst are not lent away before it comes. What carries the actions out
(Ray's autoscaler and pools live, modelled actors in the simulator) is a connector's job.
"""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from mesh.role_limits import Change
from mesh.roles import MOVABLE, Role
from scenarios.controller import Need, Observation, RatioController, pick_surplus, pool_roles


@dataclass(frozen=True)
class ScaleSettings:
    budget: int | None = None  # actors in all, over every scenario; None: no cluster limit
    start_s: float = 60.0  # how long a new actor takes to serve: the forecast horizon
    level: float = 0.5  # Holt's smoothing of the level...
    trend: float = 0.3  # ...and of the trend
    band: float = 1.0  # actors of slack before scaling in
    idle_intervals: int = 6  # intervals whose largest need decides a scale-in
    history: int = 1440  # intervals of arrivals kept to find a period (4 h at 10 s)
    min_period: int = 6  # the shortest period looked for, in intervals
    min_overlap: int = 24  # intervals of the history compared with it one period later, at least
    season_fit: float = 0.6  # autocorrelation at the period needed to forecast by it...
    # ...and at least season_z / sqrt(intervals compared): over m intervals of aperiodic noise an
    # autocorrelation is about 1/sqrt(m), and the largest of a hundred lags' a few times that (the
    # Mooncake trace showed "periods" of 48 to 311 intervals, each for a few intervals)
    season_z: float = 5.0
    # until the arrivals show a period, no scale-in below the largest need of the last reserve
    # intervals: a burst seen once may come back before a start-up time could meet it
    reserve: int = 90
    # a scenario's correction: times correct_up (up to correct_max) after an interval whose misses
    # (TTFT, TPOT or decode KV short, the worst share) exceed the goal's share by correct_z standard
    # errors over the interval's requests (one miss of eight says little), else times correct_down
    correct_up: float = 1.1
    correct_down: float = 0.98
    correct_max: float = 2.0
    correct_z: float = 2.0


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
    current: tuple[int, int]  # prefill, decode actors before
    target: tuple[int, int]  # after the actions
    forecast_rps: float
    reason: str


@dataclass
class _Trend:
    level: float | None = None
    slope: float = 0.0  # per interval
    needs: deque = field(default_factory=deque)  # actors needed, over the last idle_intervals
    rates: list = field(default_factory=list)  # arrivals/s per interval, the last `history`
    peaks: deque = field(default_factory=deque)  # actors needed, over the last `reserve` intervals
    period: int | None = None  # intervals, once the arrivals repeat
    forecast: float = 0.0  # the last forecast, arrivals/s one start-up ahead
    correction: float = 1.0  # the model's need times this: what SLO misses showed it lacks


class Autoscaler:
    def __init__(self, controller: RatioController, settings: ScaleSettings = ScaleSettings()):
        self.controller, self.settings = controller, settings
        self._trend: dict[str, _Trend] = {name: _Trend() for name in controller.specs}

    @property
    def expected(self) -> dict[str, float]:
        """Each scenario's last forecast where it comes from a period: what the controller plans
        its lends on. A trend extrapolated a start-up ahead is for starting actors, while a lend
        serves within a drain, and on noisy load the trend would lend actors to every spike."""
        return {name: t.forecast for name, t in self._trend.items() if t.period is not None}

    def forecast(self, obs: Observation) -> float:
        """Arrivals/s one start-up time ahead; updates the scenario's level, trend and history."""
        s, t = self.settings, self._trend[obs.scenario]
        if t.level is None:
            t.level = obs.arrival_rps
        else:
            previous = t.level
            t.level = s.level * obs.arrival_rps + (1 - s.level) * (t.level + t.slope)
            t.slope = s.trend * (t.level - previous) + (1 - s.trend) * t.slope
        t.rates.append(obs.arrival_rps)
        del t.rates[:-s.history]
        ahead = math.ceil(s.start_s / self.controller.settings.interval_s)
        holt = max(0.0, t.level + max(t.slope, 0.0) * ahead)  # a falling trend scales in by idling, not ahead
        period = t.period = self._period(t.rates)
        if period is None:
            t.forecast = holt
        else:
            # what came one period after the last interval, up to the horizon (and a margin of one
            # interval), and no less than now: the period foresees the rises a trend only extrapolates
            start = len(t.rates) - period
            t.forecast = max(obs.arrival_rps, max(t.rates[start:start + ahead + 2]))
        return t.forecast

    def _period(self, rates: list[float]) -> int | None:
        """The lag (intervals) at which the arrivals best repeat, if they repeat well enough:
        the highest autocorrelation, over a history that covers the period and `min_overlap`
        intervals more (a burst seen twice is enough to expect the third), among the lags past
        its first fall to zero, and well above what noise reaches over the intervals compared:
        a load that changes slowly resembles itself a few intervals later without repeating (a
        tide's rise matched itself at 6 intervals, and forecasting by that "period" met the rise
        late)."""
        s, n = self.settings, len(rates)
        if n < s.min_period + s.min_overlap:
            return None
        x = np.asarray(rates) - np.mean(rates)
        var = float(x @ x)
        if var <= 0:
            return None
        fit = [float(x[lag:] @ x[:-lag]) / var * n / (n - lag) for lag in range(1, n - s.min_overlap + 1)]
        first = next((lag for lag, f in enumerate(fit, 1) if f <= 0), None)
        if first is None:
            return None
        lags = range(max(first, s.min_period), len(fit) + 1)
        lag = max(lags, key=lambda lag: fit[lag - 1], default=None)
        if lag is None or fit[lag - 1] < max(s.season_fit, s.season_z / math.sqrt(n - lag)):
            return None
        return lag

    def step(self, observations: list[Observation], now: float) -> list[ScaleDecision]:
        s = self.settings
        total = sum(len(o.actors) for o in observations)
        plans = []
        for o in observations:
            rps = self.forecast(o)
            need, _ = self.controller.need(replace(o, arrival_rps=rps))
            c = self._trend[o.scenario].correction
            plans.append((o, rps, Need(need.prefill * c, need.decode * c)))
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
            t = self._trend[o.scenario]
            for kept, size in ((t.needs, s.idle_intervals), (t.peaks, s.reserve)):
                kept.append(need.total)
                while len(kept) > size:
                    kept.popleft()
        # the fleet keeps each scenario's floor: the largest recent need, and until its arrivals
        # show a period its reserve too; a reserve is the fleet's, the controller lends it to
        # the scenario whose burst comes
        floor = {o.scenario: self._floor(o) for o, _, _ in plans}
        spare = total - sum(floor.values())
        for o, rps, need in sorted(plans, key=lambda p: floor[p[0].scenario] - len(p[0].actors)):
            needs = self._trend[o.scenario].needs
            if o.scenario in scaled:
                needs.clear()
            elif len(needs) == s.idle_intervals and max(needs) < len(o.actors) - 1 - s.band:
                surplus = min(math.floor(len(o.actors) - max(needs) - s.band), math.floor(spare))
                if surplus <= 0:
                    continue
                needs.clear()
                d = self._remove(o, need, surplus, rps, now)
                if d:
                    spare -= len(d.actions)
                    decisions.append(d)
        for o in observations:
            self._correct(o)
        return decisions

    def _correct(self, o: Observation) -> None:
        """Raises the scenario's correction after an interval whose misses exceed its goal's share
        by more than chance over the interval's requests; lowers it after one with answers that
        does not."""
        s, t = self.settings, self._trend[o.scenario]
        shares = [1 - a for a in (o.ttft_attainment, o.tpot_attainment) if a is not None]
        if o.kv_short is not None:
            shares.append(o.kv_short)
        if not shares:
            return  # nothing ended: no evidence either way
        goal = self.controller.specs[o.scenario].slo.percentile / 100
        requests = max(o.arrival_rps * self.controller.settings.interval_s, 1.0)
        if max(shares) > 1 - goal + s.correct_z * math.sqrt(goal * (1 - goal) / requests):
            t.correction = min(s.correct_max, t.correction * s.correct_up)
        else:
            t.correction = max(1.0, t.correction * s.correct_down)

    def _floor(self, o: Observation) -> float:
        """What a scenario's share of the fleet may not shrink below: the largest need over the
        idle intervals, or over the reserve's while its arrivals show no period."""
        t = self._trend[o.scenario]
        kept = t.peaks if t.period is None else t.needs
        return max(kept, default=float(len(o.actors)))

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
        c = self._trend[o.scenario].correction
        corrected = f" (the model's x{c:.2f} for SLO misses)" if c > 1 else ""
        return ScaleDecision(now, o.scenario, tuple(actions), *_counts(o, actions), rps,
                             f"forecast {rps:.2f} req/s in {self.settings.start_s:.0f} s needs {need.total:.1f} "
                             f"actors{corrected}, has {len(o.actors)}: add "
                             + ", ".join(f"{n} {r}" for r, n in roles.items()))

    def _remove(self, o: Observation, need, n: int, rps: float, now: float) -> ScaleDecision | None:
        """Up to n actors, each from the role with the most surplus over the need, least loaded
        first, as the role rule allows."""
        spec = self.controller.specs[o.scenario]
        counts = Counter(a.role for a in o.actors)
        surplus = {Role.PREFILL: counts[Role.PREFILL] - need.prefill, Role.DECODE: counts[Role.DECODE] - need.decode}
        rules, actions, taken = pool_roles(spec, o.actors), [], set()
        for _ in range(n):
            picked = pick_surplus(o.actors, surplus, taken,
                                  lambda a, role: rules.judge(Change(a.actor_id, role, None)).allowed)
            if picked is None:
                break
            pick, role = picked
            taken.add(pick.actor_id)
            rules = rules.after(Change(pick.actor_id, role, None))
            surplus[role] -= 1
            actions.append(ScaleAction("remove", o.scenario, role, pick.actor_id))
        if not actions:
            return None
        return ScaleDecision(now, o.scenario, tuple(actions), *_counts(o, actions), rps,
                             f"needed at most {len(o.actors) - n - self.settings.band:.1f} of {len(o.actors)} actors "
                             f"for {self.settings.idle_intervals} intervals: drain and stop "
                             + ", ".join(f"{a.actor_id} ({a.role})" for a in actions))


def _counts(o: Observation, actions: list[ScaleAction]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The scenario's prefill and decode counts before and after the actions."""
    before = Counter(a.role for a in o.actors)
    after = before + Counter(a.role for a in actions if a.kind == "add")
    after.subtract(a.role for a in actions if a.kind == "remove")
    return (before[Role.PREFILL], before[Role.DECODE]), (after[Role.PREFILL], after[Role.DECODE])
