"""The scenarios one gateway serves: for each, its pool of actors, the dispatcher that runs
requests across it, and the model's tokenizer, chat template and context length."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from gateway.chat import ChatTemplate
from gateway.config import ServeConfig
from gateway.errors import GatewayError
from mesh.actor import Role
from mesh.dispatch import Dispatcher
from mesh.engine.tokenizer import Tokenizer
from mesh.pool import Hardware, Member, Pool, PoolSpec
from mesh.routing import ForwardOnRejection
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


def _context_length(model: str, engine: dict) -> int:
    if engine.get("max_model_len"):
        return int(engine["max_model_len"])
    return int(json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings", 2048))


def _hardware(spec: ScenarioSpec) -> dict[str, Hardware]:
    return {role: Hardware(hw.num_cpus, hw.num_gpus, hw.npus, dict(hw.resources)) for role, hw in spec.hardware.items()}


class Fleet:
    def __init__(self, config: ServeConfig, transport_secret: str):
        self.config = config
        self.scenarios: dict[str, Scenario] = {}
        router = ForwardOnRejection(max_forwards=config.gateway.max_forwards)
        for spec in config.scenarios:
            engine = {**config.engine, "model": spec.model}
            transport = {"backend": "ucx", **config.transport, "secret": transport_secret}
            pool = Pool(PoolSpec(spec.name, engine, transport, _hardware(spec), ttft_budget_s=spec.slo.ttft_s))
            tokenizer = Tokenizer(spec.model)
            self.scenarios[spec.name] = Scenario(spec, config.served_name(spec), pool, Dispatcher(pool, router),
                                                 tokenizer, ChatTemplate(tokenizer),
                                                 _context_length(spec.model, engine))

    async def start(self) -> None:
        """Starts every scenario's actors, all at once."""
        await asyncio.gather(*(s.pool.scale(prefill=s.spec.prefill, decode=s.spec.decode)
                               for s in self.scenarios.values()))

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

    def actor_infos(self) -> dict[str, list[dict]]:
        return {name: [m.info for m in s.pool.members.values()] for name, s in self.scenarios.items()}

    def not_ready(self) -> list[str]:
        """What keeps the fleet from serving: each scenario needs a serving prefill and decode actor."""
        problems = []
        for s in self.scenarios.values():
            for role in (Role.PREFILL, Role.DECODE):
                if not any(m.info.get("state") == "serving" for m in s.pool.by_role(role)):
                    problems.append(f"scenario {s.name!r} has no serving {role.value} actor")
        return problems

    async def close(self) -> None:
        await asyncio.gather(*(s.pool.close() for s in self.scenarios.values()), return_exceptions=True)
