"""The live control round (`scenarios.control_round.ControlRound`: the ratio controller, the
gateway's load window `gateway.observe.LoadWindow`, a connector) in the simulator, on the
simulated clock: every interval the window closes into each scenario's observed load, as the
live gateway measures it, and the decisions are applied through a connector that drains and
switches modelled actors."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.observe import LoadWindow
from mesh.roles import Role
from scenarios.control_round import ControlRound
from scenarios.controller import Action, ActorView, RatioController

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
        sim.move(a, action.role, pool)


class ControlLoop:
    def __init__(self, sim: "Simulator"):
        c = sim.cluster
        self.sim = sim
        self.window = LoadWindow({s.name: s.slo for s in c.specs}, lambda: sim.now)
        self.round = ControlRound(RatioController(c.specs, c.models, c.settings), self.window, SimConnector(sim),
                                  lambda: sim.now)
        self.timeline: list[tuple[float, int, int, int]] = []  # (time, scenario, prefill, decode)
        self.actions = {"flip": 0, "lend": 0}
        self._record(0.0)

    def tick(self) -> None:
        records = asyncio.run(self.round.round({name: self._views(k) for k, name in enumerate(self.sim.names)}))
        for r in records:
            if r.failures:  # the simulated cluster refuses nothing: a failure is a simulator bug
                raise RuntimeError(f"the simulated cluster refused: {'; '.join(r.failures)}")
            for a in r.decision.actions:
                self.actions[a.kind] += 1
        self._record(self.sim.now)

    def _views(self, pool: int) -> tuple[ActorView, ...]:
        actors = self.sim.actors
        return tuple(ActorView(str(aid), actors[aid].next_role, actors[aid].load(), not actors[aid].draining)
                     for aid in sorted(self.sim.pools[pool].members))

    def _record(self, now: float) -> None:
        actors = self.sim.actors
        for k, pool in enumerate(self.sim.pools):
            roles = [actors[aid].next_role for aid in pool.members]
            self.timeline.append((now, k, roles.count(Role.PREFILL), roles.count(Role.DECODE)))
