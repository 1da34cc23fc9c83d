"""The live control round (`scenarios.control_round.ControlRound`: the ratio controller, the
gateway's load window `gateway.observe.LoadWindow`, a connector) on the simulated clock, as
the gateway's `ControlLoop` runs it on wall time: every interval the window closes into each
scenario's observed load, as the live gateway measures it, and the decisions are applied
through a connector that drains and switches modelled actors.

The connector judges every action by the role rule the live pools apply
(`mesh.role_limits.PoolRoles`, on the actors serving now, with their devices) and refuses
what they would refuse; a refused action is counted, as the live loop logs it, and the
others go on.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING

from gateway.observe import LoadWindow
from mesh.role_limits import Change, RoleLimitError
from mesh.roles import Role
from scenarios.autoscale import Autoscaler, ScaleAction
from scenarios.control_round import ControlRound, Record
from scenarios.controller import Action, ActorView, Decision, RatioController

if TYPE_CHECKING:
    from simtests.sim import Simulator


class SimConnector:
    """Flip: drain, then switch in place. Lend: drain, then join the other scenario's pool.
    Guarded as `mesh.pool.Pool.flip` and `lend` are: in the pool it leaves and the one it joins."""

    def __init__(self, sim: "Simulator"):
        self.sim = sim

    async def apply(self, action: Action | ScaleAction) -> None:
        sim = self.sim
        if action.kind == "add":  # serves once started: after the autoscaler's start-up time
            sim.start_actor(sim.names.index(action.scenario), action.role, sim.cluster.scale.start_s)
            return
        a = sim.actors[int(action.actor_id)]
        if action.kind == "remove":
            verdict = sim.pools[a.pool].roles(sim.actors, sim.cluster.specs[a.pool]).judge(
                Change(action.actor_id, a.role, None, a.device))
            if not verdict.allowed:
                raise RoleLimitError(f"cannot remove {action.actor_id}: {verdict.reason}")
            sim.move(a, a.role, None)
            return
        to = sim.names.index(action.to_scenario) if action.kind == "lend" else a.pool
        what = f"{action.kind} {action.actor_id} to {sim.names[to]} as {action.role}"
        moves = ([Change(action.actor_id, a.role, action.role, a.device)] if to == a.pool else
                 [Change(action.actor_id, a.role, None, a.device), Change(action.actor_id, None, action.role,
                                                                          a.device)])
        for pool, change in zip((a.pool, to), moves):
            verdict = sim.pools[pool].roles(sim.actors, sim.cluster.specs[pool]).judge(change)
            if not verdict.allowed:
                raise RoleLimitError(f"cannot {what}: {verdict.reason}")
        sim.move(a, action.role, to)


class SimControl(ControlRound):
    """The shared round on the simulator, with the ratio timeline and action counts (flips,
    lends, and the actions refused by the role rule) that the reports show around it."""

    def __init__(self, sim: "Simulator"):
        c = sim.cluster
        clock = lambda: sim.now  # noqa: E731
        controller = RatioController(c.specs, c.models, c.settings)
        super().__init__(controller, LoadWindow({s.name: s.slo for s in c.specs}, clock), SimConnector(sim), clock,
                         autoscaler=Autoscaler(controller, c.scale) if sim.variant.autoscale else None)
        self.sim = sim
        self.timeline: list[tuple[float, int, int, int]] = []  # (time, scenario, prefill, decode)
        self.scale_timeline: list[tuple[float, int]] = []  # (time, actors started and not stopped)
        self.actions: Counter[str] = Counter({"flip": 0, "lend": 0, "refused": 0})
        self._record(0.0)

    def tick(self) -> None:
        asyncio.run(self.round({name: self._views(k) for k, name in enumerate(self.sim.names)}))
        self._record(self.sim.now)
        if self.autoscaler is not None:
            self.scale_timeline.append((self.sim.now, sum(a.retired_at is None for a in self.sim.actors)))

    async def apply(self, decision: Decision) -> Record:
        record = await super().apply(decision)
        self.actions.update(a.kind for a in decision.actions)
        self.actions["refused"] += len(record.failures)
        return record

    def _views(self, pool: int) -> tuple[ActorView, ...]:
        actors = self.sim.actors
        return tuple(ActorView(str(aid), actors[aid].next_role, actors[aid].load(), not actors[aid].draining,
                               actors[aid].device)
                     for aid in sorted(self.sim.pools[pool].members))

    def _record(self, now: float) -> None:
        actors = self.sim.actors
        for k, pool in enumerate(self.sim.pools):
            roles = [actors[aid].next_role for aid in pool.members]
            self.timeline.append((now, k, roles.count(Role.PREFILL), roles.count(Role.DECODE)))
