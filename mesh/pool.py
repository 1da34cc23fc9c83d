"""Pools: each scenario's actors, placed on hardware by Ray resources, replaced when they die."""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

import ray

from mesh import tracing
from mesh.actor import MeshActor, Role

log = logging.getLogger(__name__)

_ids = itertools.count()


@dataclass
class Hardware:
    """What one actor of a role asks Ray for: CPUs, GPUs, or the custom NPU resource."""
    num_cpus: float = 1
    num_gpus: float = 0
    npus: float = 0

    def options(self) -> dict:
        opts: dict = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        if self.npus:
            opts["resources"] = {"NPU": self.npus}
        return opts

    @property
    def device(self) -> str:
        return "npu" if self.npus else "cuda" if self.num_gpus else "cpu"


@dataclass
class PoolSpec:
    scenario: str
    engine: dict  # EngineConfig fields shared by every actor (model, dtype, ...)
    transport: dict = field(default_factory=dict)
    hardware: dict[str, Hardware] = field(default_factory=lambda: {
        "prefill": Hardware(), "decode": Hardware(), "both": Hardware()})
    ttft_budget_s: float = 2.0
    warmup: bool = True
    otel_env: dict = field(default_factory=tracing.otel_env)  # actors export spans where the driver does


@dataclass
class Member:
    actor_id: str
    role: Role
    handle: "ray.actor.ActorHandle"
    info: dict = field(default_factory=dict)


class Pool:
    def __init__(self, spec: PoolSpec):
        self.spec = spec
        self.members: dict[str, Member] = {}

    def by_role(self, role: Role) -> list[Member]:
        return [m for m in self.members.values() if m.role is role]

    async def add(self, role: Role | str) -> Member:
        role = Role(role)
        hw = self.spec.hardware.get(role.value, Hardware())
        actor_id = f"{self.spec.scenario}-{role.value[0]}{next(_ids)}"
        engine = {**self.spec.engine, "device": hw.device}
        actor_spec = dict(actor_id=actor_id, scenario=self.spec.scenario, role=role.value, engine=engine,
                          transport=self.spec.transport, ttft_budget_s=self.spec.ttft_budget_s,
                          warmup=self.spec.warmup, otel_env=self.spec.otel_env)
        cls = ray.remote(MeshActor).options(name=actor_id, max_concurrency=10_000, max_restarts=0,
                                            **hw.options())
        handle = cls.remote(actor_spec)
        member = Member(actor_id, role, handle)
        member.info = await handle.start.remote()
        self.members[actor_id] = member
        log.info("pool %s: added %s", self.spec.scenario, member.info)
        return member

    async def scale(self, prefill: int = 0, decode: int = 0, both: int = 0) -> None:
        """Starts actors until each role has at least the given count (in parallel)."""
        want = {Role.PREFILL: prefill, Role.DECODE: decode, Role.BOTH: both}
        adds = [self.add(role) for role, n in want.items() for _ in range(n - len(self.by_role(role)))]
        await asyncio.gather(*adds)

    async def flip(self, actor_id: str, role: Role | str, drain_timeout_s: float | None = None) -> dict:
        member = self.members[actor_id]
        result = await member.handle.set_role.remote(Role(role).value, drain_timeout_s)
        member.role = Role(role)
        member.info = result
        return result

    async def drain(self, actor_id: str, timeout_s: float | None = None) -> dict:
        """The actor takes no new work and finishes what it has; a flip makes it serve again."""
        member = self.members[actor_id]
        result = await member.handle.drain.remote(timeout_s)
        member.info = await member.handle.info.remote()
        return {**result, **member.info}

    async def lend(self, actor_id: str, other: "Pool", role: Role | str | None = None,
                   drain_timeout_s: float | None = None) -> dict:
        """Moves an actor to another scenario's pool that serves the same model: drain, relabel,
        optionally flip, and serve there; the weights stay loaded."""
        if other.spec.engine.get("model") != self.spec.engine.get("model"):
            raise ValueError(f"pools {self.spec.scenario!r} and {other.spec.scenario!r} serve different models")
        member = self.members[actor_id]
        role = Role(role) if role else member.role
        info = await member.handle.join.remote(other.spec.scenario, role.value, other.spec.ttft_budget_s,
                                               drain_timeout_s)
        del self.members[actor_id]
        member.role, member.info = role, info
        other.members[actor_id] = member
        return info

    async def remove(self, actor_id: str, drain_timeout_s: float | None = None) -> None:
        member = self.members.pop(actor_id)
        try:
            await member.handle.drain.remote(drain_timeout_s)
            await member.handle.shutdown.remote()
        except ray.exceptions.RayActorError:
            pass  # already dead
        ray.kill(member.handle)

    async def check(self, timeout_s: float = 5.0) -> list[str]:
        """Pings every actor; replaces the dead ones with fresh actors of the same role."""
        dead = []
        for m in list(self.members.values()):
            try:
                await asyncio.wait_for(m.handle.ping.remote(), timeout_s)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                dead.append(m)
        for m in dead:
            self.members.pop(m.actor_id, None)
            log.warning("pool %s: actor %s is dead, replacing it", self.spec.scenario, m.actor_id)
            await self.add(m.role)
        return [m.actor_id for m in dead]

    async def refresh(self) -> list[dict]:
        """Every live actor's info (role, state, load)."""
        infos = await asyncio.gather(*(m.handle.info.remote() for m in self.members.values()),
                                     return_exceptions=True)
        for m, info in zip(list(self.members.values()), infos):
            if isinstance(info, dict):
                m.info = info
        return [m.info for m in self.members.values()]

    async def close(self) -> None:
        for actor_id in list(self.members):
            member = self.members.pop(actor_id)
            try:
                await member.handle.shutdown.remote()
            except ray.exceptions.RayActorError:
                pass
            ray.kill(member.handle)
