"""The live ratio controller (`scenarios.controller.RatioController`) in the simulator:
every interval it gets each scenario's observed load, as the live gateway would
measure it, and its decisions are applied through a connector that drains and
switches modelled actors (`scenarios.connector.Connector`)."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from scenarios.connector import apply_all
from scenarios.controller import Action, ActorView, Observation, RatioController
from simtests.actors import ROLE_NAMES, ROLES

if TYPE_CHECKING:
    from simtests.sim import Simulator


class SimConnector:
    """Flip: drain, then switch in place. Lend: drain, then join the other scenario's pool."""

    def __init__(self, sim: "Simulator"):
        self.sim = sim

    async def apply(self, action: Action) -> None:
        sim = self.sim
        a = sim.actors[int(action.actor_id)]
        pool = sim.names.index(action.to_scenario) if action.kind == "lend" else a.pool
        sim.move(a, ROLES[action.role], pool)


class ControlLoop:
    def __init__(self, sim: "Simulator"):
        c = sim.cluster
        self.sim = sim
        self.controller = RatioController(c.specs, c.models, c.settings)
        self.connector = SimConnector(sim)
        n = len(c.specs)
        # per scenario: arrivals, prompt and output tokens, ended, TTFT ok, TPOT ok, found no decode KV
        self._counts = [[0] * n for _ in range(7)]
        self._means = [(0.0, 0.0)] * n  # the last interval's with arrivals: a quiet one keeps them
        self.timeline: list[tuple[float, int, int, int]] = []  # (time, scenario, prefill, decode)
        self.actions = {"flip": 0, "lend": 0}
        self._record(0.0)

    def arrived(self, scenario: int, prompt: int, output: int) -> None:
        c = self._counts
        c[0][scenario] += 1
        c[1][scenario] += prompt
        c[2][scenario] += output

    def kv_waited(self, scenario: int) -> None:
        self._counts[6][scenario] += 1

    def finished(self, scenario: int, ttft_ok: bool, tpot_ok: bool) -> None:
        """A request ended; a rejected one counts as a TTFT miss (prefill could not take it)."""
        c = self._counts
        c[3][scenario] += 1
        c[4][scenario] += ttft_ok
        c[5][scenario] += tpot_ok

    def tick(self, now: float) -> None:
        interval = self.sim.cluster.settings.interval_s
        arrivals, prompt, output, ended, ttft_ok, tpot_ok, kv_waits = self._counts
        observations = []
        for k, name in enumerate(self.sim.names):
            n, e = arrivals[k], ended[k]
            if n:
                self._means[k] = (prompt[k] / n, output[k] / n)
            observations.append(Observation(
                name, n / interval, *self._means[k], ttft_ok[k] / e if e else None,
                tpot_ok[k] / e if e else None, self._views(k), kv_waits[k] / n if n else None))
        self._counts = [[0] * len(row) for row in self._counts]
        decisions = self.controller.step(observations, now)
        if decisions:
            failed = asyncio.run(apply_all(self.connector, decisions))
            if failed:  # the simulated cluster refuses nothing: a failure is a simulator bug
                raise failed[0][1]
            for d in decisions:
                for a in d.actions:
                    self.actions[a.kind] += 1
        self._record(now)

    def _views(self, pool: int) -> tuple[ActorView, ...]:
        actors = self.sim.actors
        return tuple(ActorView(str(aid), ROLE_NAMES[actors[aid].next_role], actors[aid].load(),
                               not actors[aid].draining)
                     for aid in sorted(self.sim.pools[pool].members))

    def _record(self, now: float) -> None:
        actors = self.sim.actors
        for k, pool in enumerate(self.sim.pools):
            roles = [actors[aid].next_role for aid in pool.members]
            self.timeline.append((now, k, roles.count(ROLES["prefill"]), roles.count(ROLES["decode"])))
