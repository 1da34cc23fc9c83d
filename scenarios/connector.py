"""What applies the ratio controller's decisions: live Ray pools or a simulated cluster.

The controller returns `Decision`s; a connector carries out their actions. The live
one drives `mesh.pool.Pool` (flip drains then switches in place; lend moves an
actor to another scenario's pool of the same model; add starts an actor, remove drains and
stops one), never forced: the pools judge
each action by the same role rule the controller planned with, on what they see now,
and requests a drain could not finish move to other actors. The simulator has its own.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from scenarios.autoscale import ScaleAction, ScaleDecision
from scenarios.controller import Action, Decision

if TYPE_CHECKING:
    from mesh.pool import Pool
    from scenarios.mode_policy import ModeDecision


class Connector(Protocol):
    async def apply(self, action: Action | ScaleAction) -> None: ...


async def apply_all(connector: Connector, decisions: list[Decision] | list[ScaleDecision]
                    ) -> list[tuple[Action | ScaleAction, Exception]]:
    """Applies every action; one that fails does not stop the others. Returns the failures."""
    failed = []
    for decision in decisions:
        for action in decision.actions:
            try:
                await connector.apply(action)
            except Exception as e:  # an actor gone or a pool refusing: report, go on
                failed.append((action, e))
    return failed


class LiveConnector:
    """Applies actions to live pools, by scenario name."""

    def __init__(self, pools: dict[str, "Pool"], drain_timeout_s: float | None = None):
        self.pools = pools
        self.drain_timeout_s = drain_timeout_s

    async def apply(self, action: Action | ScaleAction) -> None:
        pool = self.pools[action.scenario]
        if action.kind == "flip":
            await pool.flip(action.actor_id, action.role, self.drain_timeout_s)
        elif action.kind == "lend":
            await pool.lend(action.actor_id, self.pools[action.to_scenario], action.role, self.drain_timeout_s)
        elif action.kind == "add":
            await pool.add(action.role)
        elif action.kind == "remove":
            await pool.remove(action.actor_id, self.drain_timeout_s)
        else:
            raise ValueError(f"unknown action {action.kind!r}")

    async def switch_mode(self, decision: "ModeDecision") -> None:
        """The whole pool to the decision's mode (mesh.pool.Pool.switch_mode)."""
        await self.pools[decision.scenario].switch_mode(decision.target, decision.prefill, self.drain_timeout_s)
