"""One round of the ratio controller, the same live (`gateway.control`) and simulated
(`simtests.control`): close the load window into one observation per controlled scenario,
step the controller on the clock, apply each decision through a connector, and record
what became of it.

What differs between the two is injected: the window (the gateway's `LoadWindow`, which
the simulator feeds too), the clock (wall time, or simulated time), the connector (live
pools, or modelled actors) and the actors' views. Decisions are applied one at a time,
in the controller's order; a failed action does not stop the others. With an autoscaler
(`scenarios.autoscale`), its scale decisions on the same observations follow, through the
same connector (add and remove actions). With a mode policy (`scenarios.mode_policy`), its
switches come first, through the connector's `switch_mode`, and the ratio controller and
the autoscaler then leave aggregated scenarios alone (they have no prefill:decode ratio).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

from scenarios.autoscale import Autoscaler, ScaleDecision
from scenarios.connector import Connector, apply_all
from scenarios.controller import ActorView, Decision, Observation, RatioController
from scenarios.mode_policy import ModeDecision, ModePolicy


class Window(Protocol):
    """The load over the current interval (`gateway.observe.LoadWindow`)."""

    def close(self, actors: dict[str, tuple[ActorView, ...]]) -> list[Observation]: ...


@dataclass(frozen=True)
class Record:
    """A decision and what became of it."""
    decision: Decision | ScaleDecision | ModeDecision
    failures: tuple[str, ...]  # "flip a1 -> decode: why", for each action that could not be applied


class ControlRound:
    def __init__(self, controller: RatioController, window: Window, connector: Connector,
                 clock: Callable[[], float], log_size: int = 1000, autoscaler: Autoscaler | None = None,
                 modes: ModePolicy | None = None):
        self.controller, self.window, self.connector, self.clock = controller, window, connector, clock
        self.autoscaler, self.modes = autoscaler, modes
        self.records: deque[Record] = deque(maxlen=log_size)
        self.scale_records: deque[Record] = deque(maxlen=log_size)
        self.mode_records: deque[Record] = deque(maxlen=log_size)

    async def round(self, views: dict[str, tuple[ActorView, ...]]) -> list[Record]:
        """One interval of the scenarios in `views` (those under control): observe, decide, apply;
        then scale, when an autoscaler is given."""
        observations, now = self.window.close(views), self.clock()
        if self.modes is not None:
            for switch in self.modes.step([o for o in observations if o.scenario not in self.controller.pins], now):
                self.mode_records.append(await self.switch(switch))
            observations = [o for o in observations if self.modes.ratio_controlled(o.scenario)]
        # the controller plans on the autoscaler's last forecast: its scale-outs ahead of a burst stay put
        expected = self.autoscaler.expected if self.autoscaler is not None else None
        records = [await self.apply(decision) for decision in self.controller.step(observations, now, expected)]
        if self.autoscaler is not None:
            for decision in self.autoscaler.step(observations, now):
                self.scale_records.append(await self.scale(decision))
        return records

    async def switch(self, decision: ModeDecision) -> Record:
        return await _switched(self.connector, decision)

    async def scale(self, decision: ScaleDecision) -> Record:
        return await _applied(self.connector, decision)

    async def apply(self, decision: Decision) -> Record:
        record = await _applied(self.connector, decision)
        self.records.append(record)
        return record


async def _switched(connector: Connector, decision: ModeDecision) -> Record:
    try:
        await connector.switch_mode(decision)
    except Exception as e:  # an actor gone mid-switch: the others serve, the next round sees the pool
        return Record(decision, (f"switch {decision.scenario} to {decision.target}: {e}",))
    return Record(decision, ())


async def _applied(connector: Connector, decision: Decision | ScaleDecision) -> Record:
    failed = await apply_all(connector, [decision])
    return Record(decision, tuple(f"{a.kind} {a.actor_id} -> {a.role}: {e}" for a, e in failed))
