"""The per-scenario prefill:decode ratio controller.

Every interval, for each scenario, from the observed load (arrival rate, prompt and
output lengths, TTFT/TPOT attainment), the performance model and the SLOs, it
computes how many prefill and decode actors the load needs, and the split of the
scenario's actors that balances producer (prefill) and consumer (decode). It acts
by flipping actors in place, and by lending actors between scenarios that serve the
same model toward a pool-wide share (`allocate`: each scenario's need, the headroom in
proportion to the needs; under overload the cheapest requests first, as goodput counts
them). `initial_split` gives the same shares for an expected load, where a fleet starts. Hysteresis (a dead band, a
confirmation streak and a minimum dwell time) keeps it from flapping on noise; a move
that soon reverses the last one goes half as far, so that an overloaded scenario, whose
TTFT and TPOT misses take turns, settles instead of swinging between two splits.

Every action it proposes passes the role rule (mesh.role_limits) that operator commands
follow too: each role within the scenario's limits, every actor on its role's hardware.

It is a policy: it takes observations and the clock and returns decisions, each
with its inputs, prediction and reason. What applies them (live pools, a simulated
cluster) is a connector (`scenarios.connector`).
"""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Callable, Literal

from mesh.role_limits import Change, PoolRoles
from mesh.roles import MOVABLE, Role
from scenarios.perf_model import PerfModel, RoleModels
from scenarios.spec import ScenarioSpec


@dataclass(frozen=True)
class ActorView:
    actor_id: str
    role: Role  # the role it serves, or is draining towards (BOTH: aggregated, never moved here)
    load: float = 0.0  # queued + running requests: the least loaded are moved first
    movable: bool = True  # False while draining for an earlier move
    device: str = ""  # what it runs on: cpu, cuda or npu ("": not known)


@dataclass(frozen=True)
class Observation:
    """One scenario over the last interval."""
    scenario: str
    arrival_rps: float
    mean_prompt: float
    mean_output: float
    ttft_attainment: float | None  # share of finished requests within the TTFT target; None: none finished
    tpot_attainment: float | None
    actors: tuple[ActorView, ...]
    # share of requests that found no decode KV free on arrival (waited for a lease, or were
    # rejected for want of one): their TTFT misses are decode's shortage, not prefill's
    kv_short: float | None = None


@dataclass(frozen=True)
class Action:
    kind: Literal["flip", "lend"]
    actor_id: str
    scenario: str  # where the actor is
    role: Role  # PREFILL or DECODE: the role it serves afterwards
    to_scenario: str | None = None  # for lend


@dataclass(frozen=True)
class Decision:
    time: float
    scenario: str
    actions: tuple[Action, ...]
    current: tuple[int, int]  # prefill, decode before
    target: tuple[int, int]  # after the actions
    inputs: dict
    prediction: dict
    reason: str


@dataclass(frozen=True)
class Settings:
    interval_s: float = 10.0
    min_dwell_s: float = 30.0  # since a scenario's last change
    confirm: int = 2  # consecutive intervals that must ask for the same direction
    band: float = 0.05  # dead band: ignore ideal splits within this share of the actors (at least one)
    max_step: float = 0.25  # move at most this share of the actors per decision...
    # ...unless the ideal split is farther than this share away: then all the way at once. A scenario
    # short of its share of its model's actors by more than this share of its own takes them from
    # the others whatever their dwell time (a burst does not wait for a donor's last flip to settle)
    far: float = 0.2
    utilisation: float = 0.85  # plan each role to this utilisation: headroom for queueing...
    # ...and the dead bands are shares of the actors, up to this many actors; beyond it both grow as
    # the square root of the size instead (square-root staffing): the noise of a scenario's load,
    # counted in actors, grows so, and a large pool needs less headroom for queueing, in proportion
    # to its load, than a small one (for 300 actors' worth of load 31 actors, not 53). Shares alone
    # held a scenario of 500 actors 25 actors from its ideal split
    sqrt_from: float = 100.0
    smoothing: float = 0.5  # weight of the newest observation in the moving averages
    attainment_boost: float = 1.25  # need of the role whose SLO is being missed, times this
    lend: bool = True
    # a scenario takes actors from others when short of its share (`allocate`) by more than this
    # share of its actors (at least one; beyond `sqrt_from` as the dead band): headroom moved back and
    # forth on noise costs drains
    lend_band: float = 0.15
    reversal_window_s: float = 120.0  # a move against the last one within this is damped


@dataclass
class _Memory:
    smoothed: Observation | None = None
    last_change: float = -math.inf
    streak_direction: int = 0
    streak: int = 0
    last_direction: int = 0  # of the last move
    damping: int = 0  # moves are divided by 2**damping: quick reversals in a row


@dataclass(frozen=True)
class Need:
    prefill: float
    decode: float

    @property
    def total(self) -> float:
        return self.prefill + self.decode


class RatioController:
    def __init__(self, specs: list[ScenarioSpec], models: dict[str, PerfModel | RoleModels],
                 settings: Settings = Settings(), log_size: int = 10_000):
        """models: the performance model per scenario name; RoleModels where its prefill and
        decode run on different hardware (scenarios.calibration keeps one per accelerator)."""
        missing = [s.name for s in specs if s.name not in models]
        if missing:
            raise ValueError(f"no performance model for scenarios {missing}")
        self.specs = {s.name: s for s in specs}
        self.models = {name: m if isinstance(m, RoleModels) else RoleModels(m, m) for name, m in models.items()}
        self.settings = settings
        self.paused = False
        self.pins: dict[str, tuple[int, int]] = {}
        self.log: deque[Decision] = deque(maxlen=log_size)
        self._memory = {s.name: _Memory() for s in specs}

    # -- operator controls -----------------------------------------------------------------
    def pin(self, scenario: str, prefill: int, decode: int) -> None:
        """Holds a scenario at the ratio prefill:decode (scaled to its actors); no lending."""
        self._spec(scenario)
        if prefill < 0 or decode < 0 or prefill + decode == 0:
            raise ValueError(f"bad ratio {prefill}:{decode}: both counts >= 0, not both zero")
        self.pins[scenario] = (prefill, decode)

    def unpin(self, scenario: str) -> None:
        self._spec(scenario)
        self.pins.pop(scenario, None)

    def _spec(self, scenario: str) -> ScenarioSpec:
        if scenario not in self.specs:
            raise KeyError(f"unknown scenario {scenario!r}; known: {', '.join(sorted(self.specs))}")
        return self.specs[scenario]

    # -- the policy ------------------------------------------------------------------------
    def need(self, obs: Observation) -> tuple[Need, dict]:
        """Actors of each role the load needs, with the capacity prediction behind it."""
        spec, s = self.specs[obs.scenario], self.settings
        models = self.models[obs.scenario]
        # a request's decode KV is leased before its prefill: held through the prefill and
        # the transfer (queueing before prefill shows up as attainment, and is boosted for)
        prompt, pm = obs.mean_prompt, models.prefill
        hold = pm.prefill_s(prompt, prompt * prompt) + pm.prompt_transfer_s(prompt)
        cap = models.capacity(prompt, obs.mean_output, spec.slo.tpot_s, hold_s=hold)
        p = self._staffed(obs.arrival_rps / max(cap.prefill_rps, 1e-9))
        d = self._staffed(obs.arrival_rps / max(cap.decode_rps, 1e-9))
        ttft_short, tpot_short, kv_short = self._misses(obs)
        if kv_short or (tpot_short and not ttft_short):
            d *= s.attainment_boost
        elif ttft_short and not tpot_short:
            p *= s.attainment_boost
        prediction = {"prefill_rps_per_actor": cap.prefill_rps, "decode_rps_per_actor": cap.decode_rps,
                      "decode_batch": cap.decode_batch, "prefill_needed": p, "decode_needed": d}
        return Need(p, d), prediction

    def _staffed(self, load: float) -> float:
        """Actors to plan for `load` actors' worth of work at full utilisation."""
        return load + (1 / self.settings.utilisation - 1) * self._sized(load)

    def _sized(self, actors: float) -> float:
        """What a band or headroom is a share of: the actors, or beyond `sqrt_from` a square root."""
        return min(actors, math.sqrt(actors * self.settings.sqrt_from))

    def _misses(self, obs: Observation) -> tuple[bool, bool, bool]:
        """Whether the scenario misses its TTFT goal, its TPOT goal, and finds decode KV short."""
        goal = self.specs[obs.scenario].slo.percentile / 100
        return (obs.ttft_attainment is not None and obs.ttft_attainment < goal,
                obs.tpot_attainment is not None and obs.tpot_attainment < goal,
                obs.kv_short is not None and obs.kv_short > 1 - goal)

    def step(self, observations: list[Observation], now: float,
             expected: dict[str, float] | None = None) -> list[Decision]:
        """One control interval: returns the decisions (also appended to the log). expected: the
        arrivals/s an autoscaler forecasts per scenario; a scenario's need is planned on the larger
        of that and its observed rate, so that actors scaled out ahead of a burst are not lent
        away before it comes."""
        smoothed = {o.scenario: self._smooth(o) for o in observations}
        if self.paused:
            return []
        expected = expected or {}
        needs = {name: self.need(replace(o, arrival_rps=max(o.arrival_rps, expected.get(name, 0.0))))
                 for name, o in smoothed.items()}
        decisions = self._lend(smoothed, needs, now) if self.settings.lend else []
        moved = {d.scenario for d in decisions} | {a.to_scenario for d in decisions for a in d.actions}
        for name, obs in smoothed.items():
            if name not in moved:
                d = self._flip(obs, *needs[name], now)
                if d:
                    decisions.append(d)
        self.log.extend(decisions)
        return decisions

    def _smooth(self, o: Observation) -> Observation:
        mem = self._memory[o.scenario]
        a, prev = self.settings.smoothing, mem.smoothed
        if prev is None:
            mem.smoothed = o
        else:
            mix = lambda new, old: a * new + (1 - a) * old  # noqa: E731
            mem.smoothed = replace(o, arrival_rps=mix(o.arrival_rps, prev.arrival_rps),
                                   mean_prompt=mix(o.mean_prompt, prev.mean_prompt),
                                   mean_output=mix(o.mean_output, prev.mean_output))
        return mem.smoothed

    def _flip(self, obs: Observation, need: Need, prediction: dict, now: float) -> Decision | None:
        spec, s, mem = self.specs[obs.scenario], self.settings, self._memory[obs.scenario]
        roles = [a.role for a in obs.actors]
        p, d = roles.count(Role.PREFILL), roles.count(Role.DECODE)
        n = p + d
        if n == 0:
            return None
        lo = max(spec.limits[Role.PREFILL].min, n - spec.limits[Role.DECODE].max)
        hi = min(spec.limits[Role.PREFILL].max, n - spec.limits[Role.DECODE].min)
        if lo > hi:
            return None  # the limits cannot both hold at this size; nothing a flip fixes
        pin = self.pins.get(obs.scenario)
        if pin:
            want = n * pin[0] / (pin[0] + pin[1])
            why = f"pinned at {pin[0]}:{pin[1]}"
        else:
            want = n * need.prefill / need.total if need.total > 0 else p
            why = (f"load needs {need.prefill:.1f}P:{need.decode:.1f}D "
                   f"(arrivals {obs.arrival_rps:.2f}/s, prompt {obs.mean_prompt:.0f}, output {obs.mean_output:.0f})")
        target = min(max(round(want), lo), hi)
        outside = not lo <= p <= hi  # limits changed under us: fix at once, no hysteresis
        delta = target - p
        # dead band: the ideal split must lie more than one actor (or the band) away
        within = abs(want - p) <= 0.5 + max(0.5, s.band * self._sized(n))
        # a load that needs less than one actor in all is served by any split, and a sparse
        # load's ratio swings with every request: no flip for it, while it meets its SLOs (a
        # model that overrates an actor, as one sharing its cores, can give a load that
        # swamps one prefill actor less than one actor in all). An interval that ended none
        # of its requests says nothing of that: it neither confirms a move nor breaks a streak
        sparse = need.total < 1 and p >= 1 and d >= 1
        if sparse and obs.ttft_attainment is None and obs.tpot_attainment is None and not (outside or pin):
            return None
        idle = sparse and not any(self._misses(obs)[:2])
        if not outside and (delta == 0 or ((within or idle) and not pin)):
            mem.streak, mem.streak_direction = 0, 0
            return None
        direction = 1 if delta > 0 else -1
        mem.streak = mem.streak + 1 if direction == mem.streak_direction else 1
        mem.streak_direction = direction
        if not outside and not pin and (mem.streak < s.confirm or now - mem.last_change < s.min_dwell_s):
            return None
        reversal = direction == -mem.last_direction and now - mem.last_change < s.reversal_window_s
        damping = mem.damping + 1 if reversal and not outside and not pin else 0
        # far from the ideal: the whole way in one (confirmed) move rather than max_step at a time
        reach = abs(delta) if abs(want - p) > s.far * n else max(1, math.ceil(s.max_step * n))
        step = max(1, math.ceil(min(abs(delta), reach) / 2 ** damping))
        give = Role.DECODE if direction > 0 else Role.PREFILL
        take = Role.PREFILL if direction > 0 else Role.DECODE
        chosen, rules = [], pool_roles(spec, obs.actors)
        for a in least_loaded(obs.actors, give):
            change = Change(a.actor_id, give, take, a.device)
            if len(chosen) < step and rules.judge(change).allowed:
                chosen.append(a)
                rules = rules.after(change)
        if not chosen:
            return None
        mem.last_change, mem.streak, mem.last_direction, mem.damping = now, 0, direction, damping
        new_p = p + direction * len(chosen)
        damped = f" (reverses the last move: 1/{2 ** damping} of the way)" if damping else ""
        return Decision(now, obs.scenario,
                        tuple(Action("flip", a.actor_id, obs.scenario, take) for a in chosen),
                        (p, d), (new_p, n - new_p), _inputs(obs), prediction,
                        f"{why}: flip {len(chosen)} {give} -> {take}, target {target}P:{n - target}D{damped}")

    def allocate(self, obs: dict[str, Observation], needs: dict[str, Need], actors: int) -> dict[str, int]:
        """How many of `actors` each of these scenarios (of one model) should have: what its load
        needs, and the rest spread in proportion to the needs (headroom, as one mixed pool shares
        it). When the needs add up to more than there is, the scenarios are served in order of
        priority, then of actors per request/s (the cheapest first: most requests within their
        SLOs per actor), each as much as it needs; one with arrivals keeps an actor per role, and
        so does one without while the needs leave room for it (its next request then finds a
        pool to serve it, not one that waits a control interval for actors)."""
        floor = {n: max(sum(self.specs[n].limits[r].min for r in MOVABLE), 2 if obs[n].arrival_rps > 0 else 0)
                 for n in obs}
        total = sum(needs[n].total for n in obs)
        empty = [n for n in obs if floor[n] < 2]
        if total + sum(floor.values()) + sum(2 - floor[n] for n in empty) <= actors:
            floor.update(dict.fromkeys(empty, 2))
        left = actors - sum(floor.values())
        if total <= left or total <= 0:
            share = {n: floor[n] + max(left, 0) * (needs[n].total / total if total > 0 else 1 / len(obs))
                     for n in obs}
        else:
            share = dict(floor)
            cost = lambda n: needs[n].total / max(obs[n].arrival_rps, 1e-9)  # noqa: E731
            for n in sorted(obs, key=lambda n: (-self.specs[n].priority, cost(n))):
                give = min(max(needs[n].total - floor[n], 0.0), max(left, 0.0))
                share[n] += give
                left -= give
        return _rounded(share, actors)

    def initial_split(self, observations: list[Observation]) -> dict[str, tuple[int, int]]:
        """Each scenario's prefill and decode counts for an expected load (the first window's):
        the specs' actors of each model re-split by `allocate` and each scenario's need, where a
        fleet provisioned for that load starts instead of a split written for another one."""
        obs = {o.scenario: o for o in observations}
        needs = {name: self.need(o)[0] for name, o in obs.items()}
        out = {}
        for model in {self.specs[n].model for n in obs}:
            group = [n for n in obs if self.specs[n].model == model]
            size = sum(self.specs[n].prefill + self.specs[n].decode for n in group)
            for name, n in self.allocate({g: obs[g] for g in group}, needs, size).items():
                spec, need = self.specs[name], needs[name]
                lo = max(spec.limits[Role.PREFILL].min, n - spec.limits[Role.DECODE].max, 1 if n > 1 else 0)
                hi = min(spec.limits[Role.PREFILL].max, n - spec.limits[Role.DECODE].min, n - 1 if n > 1 else n)
                p = round(n * need.prefill / need.total) if need.total > 0 else n // 2
                out[name] = (min(max(p, lo), hi), n - min(max(p, lo), hi))
        return out

    def _lend(self, obs: dict[str, Observation], needs: dict[str, tuple[Need, dict]],
              now: float) -> list[Decision]:
        """A pool-wide reassignment among the scenarios of each model (`allocate`): every scenario
        short of its share by more than the dead band (higher priority first) takes what it lacks
        at once from those above theirs (most surplus first), every move passing the role rule.
        A scenario with arrivals but none finished yet lends nothing: its need is not known yet.
        The dwell time holds no lend while a scenario of the model has arrivals and no actor, nor
        a donor's when its taker is short by more than `far` of its actors. The shares are of
        every unpinned scenario of the model, within its dwell time or not. One decision per donor
        and taker, with all the actors it moves."""
        s, obs = self.settings, dict(obs)  # each lend is seen by the next: in both pools' actors
        # a scenario with arrivals and no actor has its requests wait on nothing: its model's
        # scenarios lend to it in this round, whatever their dwell time
        empty = {self.specs[n].model for n, o in obs.items() if not o.actors and o.arrival_rps > 0}
        free = [name for name in obs if name not in self.pins]
        ready = [name for name in free
                 if self.specs[name].model in empty or now - self._memory[name].last_change >= s.min_dwell_s]
        room = {}
        for model in {self.specs[n].model for n in free}:
            group = [n for n in free if self.specs[n].model == model]
            share = self.allocate({n: obs[n] for n in group}, {n: needs[n][0] for n in group},
                                  sum(len(obs[n].actors) for n in group))
            room.update({n: len(obs[n].actors) - share[n] for n in group})  # beyond its share
        decisions = []
        band = lambda n: max(1.0, s.lend_band * self._sized(len(obs[n].actors)))  # noqa: E731
        short = sorted((n for n in ready if -room[n] >= band(n) or (room[n] < 0 and not obs[n].actors)),
                       key=lambda n: (-self.specs[n].priority, room[n]))
        for taker in short:
            model = self.specs[taker].model
            far = -room[taker] > s.far * max(len(obs[taker].actors), 1)
            donors = sorted((n for n in (free if far else ready) if n != taker and room[n] >= 1
                             and self.specs[n].model == model
                             and not (obs[n].arrival_rps > 0 and obs[n].ttft_attainment is None)),
                            key=room.get, reverse=True)
            for donor in donors:
                want = min(round(-room[taker]), math.floor(room[donor]))
                d = self._lend_some(obs[donor], needs[donor][0], obs[taker], needs[taker], want, now)
                if d:
                    decisions.append(d)
                    room[donor] -= len(d.actions)
                    room[taker] += len(d.actions)
                    obs[donor], obs[taker] = _lent(obs[donor], obs[taker], d.actions)
                if room[taker] >= -0.5:
                    break
        return decisions

    def _lend_some(self, donor: Observation, donor_need: Need, taker_obs: Observation,
                   taker_need: tuple[Need, dict], count: int, now: float) -> Decision | None:
        """Up to `count` actors from donor to taker: each from the donor's role with the most
        surplus over its need's split of what it keeps (a donor short of its need itself, under
        overload, keeps its ratio rather than giving away its scarcer role), to the taker's role
        with the most deficit, as the role rule allows."""
        dspec, tspec, taker = self.specs[donor.scenario], self.specs[taker_obs.scenario], taker_obs.scenario
        P, D = MOVABLE
        counts = {r: sum(a.role == r for a in donor.actors) for r in MOVABLE}
        tcounts = {r: sum(a.role == r for a in taker_obs.actors) for r in MOVABLE}
        need = taker_need[0]
        keeps = min(1.0, max(len(donor.actors) - count, 0) / max(donor_need.total, 1e-9))
        surplus = {P: counts[P] - donor_need.prefill * keeps, D: counts[D] - donor_need.decode * keeps}
        deficit = {P: need.prefill - tcounts[P], D: need.decode - tcounts[D]}
        donor_rules, taker_rules = pool_roles(dspec, donor.actors), pool_roles(tspec, taker_obs.actors)
        actions, gave, taken = [], Counter(), set()
        for _ in range(count):
            role = max(deficit, key=deficit.get)
            picked = pick_surplus(donor.actors, surplus, taken, lambda a, give: (
                donor_rules.judge(Change(a.actor_id, give, None)).allowed
                and taker_rules.judge(Change(a.actor_id, None, role, a.device)).allowed))
            if picked is None:
                break
            pick, give = picked
            taken.add(pick.actor_id)
            donor_rules = donor_rules.after(Change(pick.actor_id, give, None))
            taker_rules = taker_rules.after(Change(pick.actor_id, None, role, pick.device))
            surplus[give] -= 1
            deficit[role] -= 1
            gave[give] += 1
            actions.append(Action("lend", pick.actor_id, donor.scenario, role, taker))
        if not actions:
            return None
        for name in (donor.scenario, taker):
            self._memory[name].last_change = now
        moved = ", ".join(f"{a.actor_id} as {a.role}" for a in actions)
        return Decision(now, donor.scenario, tuple(actions), (counts[P], counts[D]),
                        (counts[P] - gave[P], counts[D] - gave[D]),
                        {"donor": _inputs(donor), "taker": _inputs(taker_obs)},
                        {"donor_needs": donor_need.total, "taker_needs": need.total, **taker_need[1]},
                        f"{taker} needs {need.total:.1f} actors and has {len(taker_obs.actors)}; "
                        f"{donor.scenario} needs {donor_need.total:.1f} of {len(donor.actors)}: "
                        f"lend {len(actions)} to {taker} ({moved})")


def _lent(donor: Observation, taker: Observation, actions: tuple[Action, ...]) -> tuple[Observation, Observation]:
    """Both scenarios once the lends are made: each actor draining toward its role in the taker."""
    views = {a.actor_id: a for a in donor.actors}
    joined = tuple(replace(views[a.actor_id], role=a.role, movable=False) for a in actions)
    return (replace(donor, actors=tuple(v for v in donor.actors if v.actor_id not in {a.actor_id for a in actions})),
            replace(taker, actors=taker.actors + joined))


def _rounded(shares: dict[str, float], total: int) -> dict[str, int]:
    """Whole actors summing to `total`, by largest remainders."""
    out = {n: math.floor(v) for n, v in shares.items()}
    for n in sorted(shares, key=lambda n: out[n] - shares[n])[:max(total - sum(out.values()), 0)]:
        out[n] += 1
    return out


def least_loaded(actors: tuple[ActorView, ...], role: Role) -> list[ActorView]:
    return sorted((a for a in actors if a.role == role and a.movable), key=lambda a: a.load)


def pick_surplus(actors: tuple[ActorView, ...], surplus: dict[Role, int], taken: set[str],
                 allowed: Callable[[ActorView, Role], bool]) -> tuple[ActorView, Role] | None:
    """The least loaded actor not yet taken from the role with the most surplus (then the
    next role) that `allowed` lets go; None when no role has one."""
    for role in sorted(surplus, key=surplus.get, reverse=True):
        pick = next((a for a in least_loaded(actors, role) if a.actor_id not in taken and allowed(a, role)), None)
        if pick:
            return pick, role
    return None


def pool_roles(spec: ScenarioSpec, actors: tuple[ActorView, ...]) -> PoolRoles:
    """What the role rule looks at for a scenario, as the controller sees it."""
    return PoolRoles(spec.name, Counter(a.role for a in actors), spec.limits,
                     {role: hw.device for role, hw in spec.hardware.items()})


def _inputs(o: Observation) -> dict:
    return {"arrival_rps": o.arrival_rps, "mean_prompt": o.mean_prompt, "mean_output": o.mean_output,
            "ttft_attainment": o.ttft_attainment, "tpot_attainment": o.tpot_attainment,
            "kv_short": o.kv_short, "actors": len(o.actors)}
