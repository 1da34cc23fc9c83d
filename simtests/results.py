"""What a simulation run measured: per-request times as arrays, and the figures the reports
print (TTFT/TPOT percentiles, SLO attainment, goodput, utilisation, ratio changes)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from mesh.roles import Role

if TYPE_CHECKING:
    from simtests.sim import Simulator
    from simtests.workload import Workload

ACTIVE, DONE, REJECTED = 0, 1, 2  # a request's state in the simulator


@dataclass(frozen=True)
class Stats:
    scenario: str
    requests: int
    rejected: int
    ttft_p50_s: float  # of the served requests
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    tpot_p99_s: float
    ttft_attainment: float  # share of all requests (rejected ones miss) within the TTFT target
    tpot_attainment: float
    slo_attainment: float  # within both
    goodput: float  # requests within both targets per second per actor
    transfer_mean_s: float
    prefix_hit_rate: float  # share of the served requests' prompt tokens found in a prefix cache


class Run:
    def __init__(self, sim: "Simulator", w: "Workload", wall_s: float, cpu_s: float):
        self.names = list(sim.names)
        self.wall_s, self.cpu_s, self.events, self.end_s = wall_s, cpu_s, sim.events, sim.now
        self.span_s = w.duration_s or sim.now
        self.actor_hours = sum(a.alive_s(sim.now) for a in sim.actors) / 3600
        # goodput is per actor: a fleet that scaled counts its mean size over the run
        scaled = any(a.born > 0 or a.retired_at is not None for a in sim.actors)
        self.actors = self.actor_hours * 3600 / sim.now if scaled else len(sim.actors)
        self.scenario = np.asarray(sim.scen)
        self.state = np.asarray(sim.state)
        arrival, first, done = (np.asarray(x, dtype=float) for x in (sim.arrival, sim.t_first, sim.t_done))
        out = np.asarray(sim.output)
        self.done_at = done  # when each request ended (served or refused), simulated seconds
        self.ttft = first - arrival
        self.tpot = np.where(out > 1, (done - first) / np.maximum(out - 1, 1), 0.0)
        self.transfer_s = np.asarray(sim.xfer)
        self.prompt, self.hit = np.asarray(sim.prompt), np.asarray(sim.hit)
        targets = lambda xs: np.asarray(xs)[self.scenario]  # noqa: E731
        served = self.state == DONE
        self.ttft_ok = served & (self.ttft <= targets(sim.ttft_target))
        self.tpot_ok = served & (self.tpot <= targets(sim.tpot_target))
        self.utilisation = _utilisation(sim)
        control = sim.control
        self.timeline = control.timeline if control else []
        self.actions = dict(control.actions) if control else {"flip": 0, "lend": 0, "refused": 0}
        self.scale_timeline = control.scale_timeline if control else []

    @property
    def events_per_s(self) -> float:
        return self.events / max(self.wall_s, 1e-9)

    def stats(self) -> list[Stats]:
        """One row per scenario, then one for all requests."""
        rows = [self._stats(name, self.scenario == k) for k, name in enumerate(self.names)]
        return rows + [self._stats("all", np.ones(len(self.scenario), dtype=bool))]

    def _stats(self, name: str, mask: np.ndarray) -> Stats:
        n = int(mask.sum())
        served = mask & (self.state == DONE)
        pct = lambda x, q: float(np.percentile(x[served], q)) if served.any() else float("nan")  # noqa: E731
        share = lambda ok: float((ok & mask).sum() / n) if n else float("nan")  # noqa: E731
        both = self.ttft_ok & self.tpot_ok
        return Stats(name, n, int((mask & (self.state == REJECTED)).sum()),
                     pct(self.ttft, 50), pct(self.ttft, 90), pct(self.ttft, 99),
                     pct(self.tpot, 50), pct(self.tpot, 90), pct(self.tpot, 99),
                     share(self.ttft_ok), share(self.tpot_ok), share(both),
                     float((both & mask).sum()) / self.span_s / self.actors,
                     float(self.transfer_s[served].mean()) if served.any() else float("nan"),
                     float(self.hit[served].sum() / self.prompt[served].sum()) if served.any() else float("nan"))

    def to_dict(self) -> dict:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s, "events": self.events, "events_per_s": self.events_per_s,
                "simulated_s": self.end_s, "actors": self.actors, "actor_hours": self.actor_hours,
                "utilisation": self.utilisation,
                "actions": self.actions, "scenarios": [asdict(s) for s in self.stats()]}


def _utilisation(sim: "Simulator") -> dict[str, float]:
    """Busy share of the time actors spent in each role (decode: a non-empty batch)."""
    busy = dict.fromkeys(Role, 0.0)
    held = dict.fromkeys(Role, 0.0)
    for a in sim.actors:
        for role in held:
            held[role] += a.role_s[role] + (sim.now - a.role_since if a.role is role and a.retired_at is None else 0.0)
        if a.role is Role.BOTH:
            busy[Role.BOTH] += a.prefill_busy_s + a.decode_busy_s
        else:  # an actor that flipped was busy in both roles, each in its own time
            busy[Role.PREFILL] += a.prefill_busy_s
            busy[Role.DECODE] += a.decode_busy_s
    names = {Role.PREFILL: "prefill", Role.DECODE: "decode", Role.BOTH: "aggregated"}
    return {names[r]: busy[r] / held[r] for r in held if held[r] > 0}
