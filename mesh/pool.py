"""Pools: each scenario's actors, placed on hardware by Ray resources, replaced when they die."""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field

import ray

from mesh import tracing
from mesh.actor import MeshActor, Role, State
from mesh.errors import MeshError
from mesh.role_limits import Bounds, Change, Limits, PoolRoles, RoleLimitError, device_for, device_kind

log = logging.getLogger(__name__)

_ids = itertools.count()


@dataclass
class Hardware:
    """What one actor of a role asks Ray for: CPUs, GPUs, the custom NPU resource, and
    any other custom resources that place it on particular nodes."""
    num_cpus: float = 1
    num_gpus: float = 0
    npus: float = 0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources: where actors go

    def options(self) -> dict:
        opts: dict = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        resources = {**self.resources, **({"NPU": self.npus} if self.npus else {})}
        if resources:
            opts["resources"] = resources
        return opts

    @property
    def device(self) -> str:
        return device_for(self.num_gpus, self.npus)


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
    # each role's [min, max] serving actors (mesh.role_limits); the defaults are a scenario file's
    limits: dict[str, Limits] = field(default_factory=lambda: {"prefill": Bounds(1), "decode": Bounds(1)})


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

    async def flip(self, actor_id: str, role: Role | str, drain_timeout_s: float | None = None,
                   force: bool = False) -> dict:
        """Drains the actor and switches its role in place. Refused (RoleLimitError) when that
        breaks the role limits or hardware rules, unless forced: then "warning" says what was
        overridden."""
        member = self.members[actor_id]
        role = Role(role)
        warning = self.guard(f"flip {actor_id} to {role.value}", self._change(member, role), force)
        result = await self._stopping(member, member.handle.set_role.remote(role.value, drain_timeout_s))
        member.role = role
        member.info = result
        return {**result, "warning": warning}

    async def drain(self, actor_id: str, timeout_s: float | None = None, force: bool = False) -> dict:
        """The actor takes no new work and finishes what it has (what is left after the timeout
        moves to other actors); a flip makes it serve again. Guarded as flip is."""
        member = self.members[actor_id]
        warning = self.guard(f"drain {actor_id}", self._change(member, None), force)
        result = await self._stopping(member, member.handle.drain.remote(timeout_s))
        member.info = await member.handle.info.remote()
        return {**result, **member.info, "warning": warning}

    async def lend(self, actor_id: str, other: "Pool", role: Role | str | None = None,
                   drain_timeout_s: float | None = None, force: bool = False) -> dict:
        """Moves an actor to another scenario's pool that serves the same model: drain, relabel,
        optionally flip, and serve there; the weights stay loaded. Guarded in both pools."""
        if other.spec.engine.get("model") != self.spec.engine.get("model"):
            raise ValueError(f"pools {self.spec.scenario!r} and {other.spec.scenario!r} serve different models")
        member = self.members[actor_id]
        role = Role(role) if role else member.role
        what = f"lend {actor_id} to {other.spec.scenario} as {role.value}"
        joining = Change(actor_id, None, role.value, device_kind(member.info.get("device", "")))
        warnings = [self.guard(what, self._change(member, None), force), other.guard(what, joining, force)]
        warning = "; ".join(w for w in warnings if w) or None
        info = await self._stopping(member, member.handle.join.remote(other.spec.scenario, role.value,
                                                                      other.spec.ttft_budget_s, drain_timeout_s))
        del self.members[actor_id]
        member.role, member.info = role, info
        other.members[actor_id] = member
        return {**info, "warning": warning}

    async def remove(self, actor_id: str, drain_timeout_s: float | None = None, force: bool = False) -> dict:
        """Drains the actor, then stops it. Guarded as flip is."""
        member = self.members[actor_id]
        warning = self.guard(f"remove {actor_id}", self._change(member, None), force)
        del self.members[actor_id]
        try:
            await member.handle.drain.remote(drain_timeout_s)
            await member.handle.shutdown.remote()
        except ray.exceptions.RayActorError:
            pass  # already dead
        ray.kill(member.handle)
        return {"actor_id": actor_id, "warning": warning}

    def roles(self) -> PoolRoles:
        """What the role rule looks at: actors serving each role, the limits, each role's device."""
        serving = Counter(m.role.value for m in self.members.values() if m.info.get("state") == State.SERVING.value)
        return PoolRoles(self.spec.scenario, serving, self.spec.limits,
                         {role: hw.device for role, hw in self.spec.hardware.items()})

    @staticmethod
    def _change(member: Member, role: Role | None) -> Change:
        serving = member.info.get("state") == State.SERVING.value
        return Change(member.actor_id, member.role.value if serving else None, role and role.value,
                      device_kind(member.info.get("device", "")))

    def guard(self, what: str, change: Change, force: bool) -> str | None:
        """Raises RoleLimitError for a change the rule refuses in this pool (`what`: the
        operation, for the message); when forced, logs and returns the warning instead."""
        verdict = self.roles().judge(change)
        if verdict.allowed:
            return None
        if not force:
            raise RoleLimitError(f"cannot {what}: {verdict.reason}")
        warning = f"forced to {what}: {verdict.reason}"
        log.warning("pool %s: %s", self.spec.scenario, warning)
        return warning

    async def _stopping(self, member: Member, call):
        """Awaits a call that takes the actor out of service. It counts as not serving from now
        on (the role rule sees it at once); a dead actor answers in one line."""
        member.info = {**member.info, "state": State.DRAINING.value}
        try:
            return await call
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            raise MeshError("unavailable", f"actor {member.actor_id} is dead: nothing was changed "
                                           f"(`pdmesh status` lists the pool's actors)") from None

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
