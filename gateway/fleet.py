"""The scenarios one gateway serves: for each, its pool of actors, the supervisor that keeps
the pool whole, the dispatcher that runs requests across it, and the model's tokenizer, chat
template and context length."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gateway.chat import ChatTemplate
from gateway.config import ServeConfig
from gateway.errors import GatewayError
from mesh import (ActorReport, ActorState, CrossScenarioOverflow, Dispatcher, EngineConfig, ForwardOnRejection,
                  Member, Neighbour, Pool, PoolSpec, RestartPolicy, Role, Supervisor, Tokenizer)
from scenarios.conditional import conditional_for
from scenarios.spec import ScenarioSpec

log = logging.getLogger(__name__)


@dataclass
class Scenario:
    spec: ScenarioSpec
    served_model: str
    pool: Pool
    dispatcher: Dispatcher
    tokenizer: Tokenizer
    chat: ChatTemplate
    max_model_len: int

    @property
    def name(self) -> str:
        return self.spec.name


def _context_length(engine: EngineConfig) -> int:
    if engine.max_model_len:
        return engine.max_model_len
    return int(json.loads((Path(engine.model) / "config.json").read_text()).get("max_position_embeddings", 2048))


class Fleet:
    def __init__(self, config: ServeConfig, transport_secret: str, restart: RestartPolicy = RestartPolicy()):
        self.config = config
        self.restart = restart
        self.scenarios: dict[str, Scenario] = {}
        self.supervisors: list[Supervisor] = []
        router = ForwardOnRejection(max_forwards=config.gateway.max_forwards)
        for spec in config.scenarios:
            engine = config.engine_for(spec.model)
            pool = Pool(PoolSpec(spec.name, engine, config.transport_with(transport_secret), dict(spec.hardware),
                                 ttft_budget_s=spec.slo.ttft_s, limits=dict(spec.limits), mode=spec.mode))
            tokenizer = Tokenizer(spec.model)
            model = config.controller.perf_model()
            dispatcher = Dispatcher(pool, router, conditional=conditional_for(spec, model),
                                    overflow=CrossScenarioOverflow() if spec.overflow else None,
                                    priority=spec.priority, neighbours=lambda name=spec.name: self._neighbours(name),
                                    transfer_s=model.prompt_transfer_s)
            self.scenarios[spec.name] = Scenario(spec, config.served_name(spec), pool, dispatcher,
                                                 tokenizer, ChatTemplate(tokenizer), _context_length(engine))

    def _neighbours(self, name: str) -> list[Neighbour]:
        """The scenarios of the same model that take a scenario's refused requests (both allow it)."""
        spec = self.scenarios[name].spec
        return [Neighbour(o.name, o.spec.priority, o.spec.slo.ttft_s, o.pool) for o in self.scenarios.values()
                if o.name != name and o.spec.model == spec.model and o.spec.overflow]

    async def start(self, on_change: Callable[[], None] | None = None) -> None:
        """Starts every scenario's actors, all at once, then supervises them; on_change is
        called after each death and replacement."""
        await asyncio.gather(*(s.pool.scale(prefill=s.spec.prefill, decode=s.spec.decode, both=s.spec.both)
                               for s in self.scenarios.values()))
        self.supervisors = [Supervisor(s.pool, self.restart, on_change) for s in self.scenarios.values()]
        for supervisor in self.supervisors:
            supervisor.start()

    def get(self, scenario: str) -> Scenario:
        try:
            return self.scenarios[scenario]
        except KeyError:
            raise GatewayError("not_found", f"unknown scenario {scenario!r}; this gateway serves: "
                                            f"{', '.join(sorted(self.scenarios))}") from None

    def find_actor(self, actor_id: str) -> tuple[Scenario, Member]:
        for s in self.scenarios.values():
            if actor_id in s.pool.members:
                return s, s.pool.members[actor_id]
        raise GatewayError("not_found", f"no actor {actor_id!r}; `pdmesh status` lists the actors")

    async def refresh(self) -> None:
        """Every actor's role, state and load, for placement order, readiness and metrics."""
        await asyncio.gather(*(s.pool.refresh() for s in self.scenarios.values()))

    def actor_infos(self) -> dict[str, list[ActorReport]]:
        """Every actor of every scenario, those starting and dead included (state says which)."""
        return {name: [m.info for m in (*s.pool.members.values(), *s.pool.offline.values())]
                for name, s in self.scenarios.items()}

    def not_ready(self) -> list[str]:
        """The scenarios that cannot serve at all, and why: each needs a serving actor of every
        role its pool's mode serves with (prefill and decode, or both), or a serving actor that
        does both; while a pool switches modes, any serving actor runs requests whole
        (mesh.dispatch), so one is enough."""
        problems = []
        for s in self.scenarios.values():
            if _serving(s.pool, Role.BOTH) or s.pool.switching and any(_serving(s.pool, r) for r in Role):
                continue
            for role in s.pool.mode.roles:
                if not _serving(s.pool, role):
                    problems.append(f"scenario {s.name!r} has no serving {role.value} actor{_offline(s.pool, role)}")
        return problems

    async def close(self) -> None:
        await asyncio.gather(*(supervisor.close() for supervisor in self.supervisors))
        for s in self.scenarios.values():
            await s.dispatcher.close()
        await asyncio.gather(*(s.pool.close() for s in self.scenarios.values()), return_exceptions=True)


def _serving(pool: Pool, role: Role) -> bool:
    return any(m.info.state is ActorState.SERVING for m in pool.by_role(role))


def _offline(pool: Pool, role: Role) -> str:
    """Why not: the role's actors that are starting or dead."""
    states = [f"{m.actor_id} {m.info.state}" + (f" ({m.life.reason})" if m.life.reason else "")
              for m in pool.offline.values() if m.role is role]
    return f": {'; '.join(states)}" if states else ""
