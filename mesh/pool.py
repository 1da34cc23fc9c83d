"""Pools: each scenario's actors, placed on hardware by Ray resources.

An actor whose engine spans tensor-parallel ranks gets a placement group of one bundle per
rank (its role's hardware each), STRICT_PACK on one node, and starts in bundle 0; the other
bundles hold the devices its worker ranks (processes its engine starts) run on. The group
lives as long as the actor: it goes when the actor is removed, lost or closed.

`members` are the actors that started: the dispatcher routes to them alone. `offline` are
those starting or dead, shown in status and metrics and never routed; a death moves an actor
from `members` to `offline` at once (`lose`), and its replacement (mesh.supervisor) goes from
`offline` to `members` once it serves. Every change of either wakes those waiting in `changed`.

`mode` is how the dispatcher runs requests here (mesh.serving_mode). `switch_mode` moves the
whole pool to another mode one actor at a time, each flip a drain: at every moment the other
actors serve, and the dispatcher runs each request on whatever serves (mesh.dispatch).
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mesh import faults, tracing
from mesh.actor import MeshActor
from mesh.api import ActorReport, ActorSpec, ActorState, DrainResult, EngineConfig, Life, Role
from mesh.errors import MeshError
from mesh.hardware import Hardware
from mesh.placement import placed, unmet
from mesh.role_limits import Bounds, Change, Limits, PoolRoles, RoleLimitError, device_kind
from mesh.serving_mode import Mode

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

    from transport import TransportConfig

log = logging.getLogger(__name__)

# Ray starts its workers at niceness 15 (its `worker_niceness`), made for background tasks: an
# engine's OpenMP threads then lose their cores to every process at the default niceness (the
# gateway, the clients, Ray's own daemons) and wait for each other at every op's barrier, which
# made decode steps in a server about twice as slow as alone. Mesh actors are the serving path.
ACTOR_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}

_ids = itertools.count()


@dataclass
class PoolSpec:
    scenario: str
    engine: EngineConfig  # shared by every actor (model, dtype, ...); the device is each role's hardware's
    transport: "TransportConfig"
    hardware: dict[str, Hardware] = field(default_factory=lambda: {
        "prefill": Hardware(), "decode": Hardware(), "both": Hardware()})
    ttft_budget_s: float = 2.0
    warmup: bool = True
    otel_env: dict = field(default_factory=tracing.otel_env)  # actors export spans where the driver does
    # each role's [min, max] serving actors (mesh.role_limits); the defaults are a scenario file's
    limits: dict[str, Limits] = field(default_factory=lambda: {"prefill": Bounds(1), "decode": Bounds(1)})
    faults: str = field(default_factory=lambda: os.environ.get(faults.ENV, ""))  # test hooks (mesh.faults)
    fault_log: str | None = field(default_factory=lambda: os.environ.get(faults.LOG_ENV) or None)
    layerwise_kv: bool = False  # prefills send each layer's KV as soon as it is computed
    mode: Mode = Mode.DISAGGREGATED  # the pool's mode at start (mesh.serving_mode)


@dataclass
class Member:
    actor_id: str
    role: Role
    handle: "ray.actor.ActorHandle | None"  # None only while its placement group is reserved
    info: ActorReport  # its last report (the pool's own while it starts, and once it is dead)
    hardware: Hardware | None = None  # what it runs on: a replacement asks Ray for the same
    life: Life = Life()  # when it started, served, died; which actor it replaced
    placement: "PlacementGroup | None" = None  # its ranks' bundles, for a tensor-parallel actor
    missed_reports: int = 0  # load reports in a row that failed or timed out
    waiting_for: str | None = None  # starting, and no node has these Ray resources free (mesh.placement)


class Pool:
    def __init__(self, spec: PoolSpec):
        self.spec = spec
        self.mode = spec.mode
        self.switching = False  # while switch_mode flips the actors
        self.members: dict[str, Member] = {}  # started: routed to
        self.offline: dict[str, Member] = {}  # starting or dead: shown, never routed
        # The supervisor's ear (mesh.supervisor): lost(actor_id, reason, certain) for a failed call.
        self.on_lost: Callable[[str, str, bool], None] | None = None
        self._waiters: list[asyncio.Future] = []

    def by_role(self, role: Role) -> list[Member]:
        return [m for m in self.members.values() if m.role is role]

    async def add(self, role: Role | str, hardware: Hardware | None = None, replaces: Member | None = None,
                  start_timeout_s: float | None = None, created: Callable[[Member], None] | None = None) -> Member:
        """Starts one actor of the role (on `hardware`, else the role's); `offline` shows it as
        starting until it serves, with `waiting_for` set while Ray has no node for it.
        `created(member)` is called as soon as Ray has the actor. A start that fails, times out
        or is cancelled kills what Ray started."""
        role = Role(role)
        hw = hardware or self.spec.hardware.get(role.value, Hardware())
        actor_id = f"{self.spec.scenario}-{role.value[0]}{next(_ids)}"
        engine = self.engine_for(hw)
        actor_spec = ActorSpec(actor_id, self.spec.scenario, role, engine, self.spec.transport,
                               ttft_budget_s=self.spec.ttft_budget_s, warmup=self.spec.warmup,
                               otel_env=self.spec.otel_env, faults=self.spec.faults, fault_log=self.spec.fault_log,
                               layerwise_kv=self.spec.layerwise_kv)
        life = Life(starting_at=time.time())
        if replaces is not None:
            life = dataclasses.replace(life, replaces=replaces.actor_id, dead_at=replaces.life.dead_at)
        member = Member(actor_id, role, None, ActorReport(actor_id, self.spec.scenario, role, ActorState.STARTING),
                        hardware=hw, life=life, waiting_for=unmet(hw.options(engine.tensor_parallel_size)))
        self.offline[actor_id] = member
        self._changed()
        if created is not None:
            created(member)
        try:
            options = hw.options(engine.tensor_parallel_size)
            if engine.tensor_parallel_size > 1:
                member.placement = await _ranks_placement(actor_id, hw, engine.tensor_parallel_size, start_timeout_s)
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(member.placement, 0)
            cls = ray.remote(MeshActor).options(name=actor_id, max_concurrency=10_000, max_restarts=0,
                                                runtime_env=ACTOR_ENV, **options)
            member.handle = cls.remote(actor_spec)
            info = await asyncio.wait_for(member.handle.start.remote(), start_timeout_s)
        except BaseException:
            _end(member)
            raise
        finally:
            self.offline.pop(actor_id, None)
            self._changed()
        member.life = dataclasses.replace(member.life, serving_at=time.time())
        member.info, member.waiting_for = info, None
        self.members[actor_id] = member
        self._changed()
        log.info("pool %s: %s serves as %s on %s (pid %s), started in %.1f s", self.spec.scenario, actor_id,
                 role.value, member.info.device, member.info.pid, member.life.serving_at - member.life.starting_at)
        return member

    def engine_for(self, hw: Hardware) -> EngineConfig:
        """An actor's engine on this hardware: its device, and its tensor-parallel size (the
        hardware's, else the pool's engine's)."""
        return self.spec.engine.model_copy(update={
            "device": hw.device, "tensor_parallel_size": hw.tensor_parallel_size or self.spec.engine.tensor_parallel_size})

    async def scale(self, prefill: int = 0, decode: int = 0, both: int = 0) -> None:
        """Starts actors until each role has at least the given count (in parallel)."""
        want = {Role.PREFILL: prefill, Role.DECODE: decode, Role.BOTH: both}
        adds = [self.add(role) for role, n in want.items() for _ in range(n - len(self.by_role(role)))]
        await asyncio.gather(*adds)

    async def flip(self, actor_id: str, role: Role | str, drain_timeout_s: float | None = None,
                   force: bool = False) -> DrainResult:
        """Drains the actor and switches its role in place. Refused (RoleLimitError) when that
        breaks the role limits or hardware rules, unless forced: then `warning` says what was
        overridden."""
        member = self.members[actor_id]
        role = Role(role)
        warning = self.guard(f"flip {actor_id} to {role.value}", self._change(member, role), force)
        result = await self._set_role(member, role, drain_timeout_s)
        return dataclasses.replace(result, warning=warning)

    async def _set_role(self, member: Member, role: Role, drain_timeout_s: float | None) -> DrainResult:
        result = await self._stopping(member, member.handle.set_role.remote(role, drain_timeout_s))
        member.role = role
        member.info = result.report
        return result

    async def switch_mode(self, mode: Mode | str, prefill: int = 1,
                          drain_timeout_s: float | None = None) -> list[DrainResult]:
        """Moves the pool to `mode`: aggregated flips every actor to both; the others flip
        `prefill` of the both actors to prefill and the rest to decode. One flip at a time, and
        actors already in their role are left alone, so the others serve throughout (a pool of
        one actor serves from it again once its flip is done, as after any flip). The role
        limits judge ratios within a mode, not a switch between modes: not checked here."""
        mode = Mode(mode)
        if mode is Mode.AGGREGATED:
            # prefill actors first: the decode actors keep the split path open meanwhile
            moves = [(m, Role.BOTH) for role in (Role.PREFILL, Role.DECODE) for m in self.by_role(role)]
        else:
            both = self.by_role(Role.BOTH)
            have = len(self.by_role(Role.PREFILL))
            moves = [(m, Role.PREFILL if i < prefill - have else Role.DECODE) for i, m in enumerate(both)]
        self.mode = mode
        self.switching = True
        results = []
        try:
            for member, role in moves:
                if member.actor_id in self.members:  # not lost meanwhile
                    results.append(await self._set_role(member, role, drain_timeout_s))
        finally:
            self.switching = False
        log.info("pool %s: now %s (%s)", self.spec.scenario, mode.value,
                 ", ".join(f"{m.actor_id} {m.role.value}" for m in self.members.values()))
        return results

    async def drain(self, actor_id: str, timeout_s: float | None = None, force: bool = False) -> DrainResult:
        """The actor takes no new work and finishes what it has (what is left after the timeout
        moves to other actors); a flip makes it serve again. Guarded as flip is."""
        member = self.members[actor_id]
        warning = self.guard(f"drain {actor_id}", self._change(member, None), force)
        result = await self._stopping(member, member.handle.drain.remote(timeout_s))
        member.info = result.report
        return dataclasses.replace(result, warning=warning)

    async def lend(self, actor_id: str, other: "Pool", role: Role | str | None = None,
                   drain_timeout_s: float | None = None, force: bool = False) -> DrainResult:
        """Moves an actor to another scenario's pool that serves the same model: drain, relabel,
        optionally flip, and serve there; the weights stay loaded. Guarded in both pools."""
        if other.spec.engine.model != self.spec.engine.model:
            raise ValueError(f"pools {self.spec.scenario!r} and {other.spec.scenario!r} serve different models")
        member = self.members[actor_id]
        role = Role(role) if role else member.role
        what = f"lend {actor_id} to {other.spec.scenario} as {role.value}"
        joining = Change(actor_id, None, role.value, device_kind(member.info.device or ""))
        warnings = [self.guard(what, self._change(member, None), force), other.guard(what, joining, force)]
        warning = "; ".join(w for w in warnings if w) or None
        result = await self._stopping(member, member.handle.join.remote(other.spec.scenario, role,
                                                                        other.spec.ttft_budget_s, drain_timeout_s))
        del self.members[actor_id]
        member.role = role
        member.info = result.report
        other.members[actor_id] = member
        return dataclasses.replace(result, warning=warning)

    async def remove(self, actor_id: str, drain_timeout_s: float | None = None, force: bool = False) -> DrainResult:
        """Drains the actor, then stops it. Guarded as flip is."""
        member = self.members[actor_id]
        warning = self.guard(f"remove {actor_id}", self._change(member, None), force)
        del self.members[actor_id]
        result = DrainResult((), member.info)
        try:
            result = await member.handle.drain.remote(drain_timeout_s)
            await member.handle.shutdown.remote()
        except ray.exceptions.RayActorError:
            pass  # already dead
        _end(member)
        return dataclasses.replace(result, warning=warning)

    def roles(self) -> PoolRoles:
        """What the role rule looks at: actors serving each role, the limits, each role's device."""
        serving = Counter(m.role.value for m in self.members.values() if m.info.state is ActorState.SERVING)
        return PoolRoles(self.spec.scenario, serving, self.spec.limits,
                         {role: hw.device for role, hw in self.spec.hardware.items()})

    @staticmethod
    def _change(member: Member, role: Role | None) -> Change:
        serving = member.info.state is ActorState.SERVING
        return Change(member.actor_id, member.role.value if serving else None, role and role.value,
                      device_kind(member.info.device or ""))

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
        member.info = dataclasses.replace(member.info, state=ActorState.DRAINING)
        try:
            return await call
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            raise MeshError("unavailable", f"actor {member.actor_id} is dead: nothing was changed "
                                           f"(`pdmesh status` lists the pool's actors)") from None

    def lose(self, actor_id: str, reason: str) -> Member | None:
        """The actor is dead (or hung): out of routing at once, shown as dead, its process
        killed in case it still runs. None when it is no member (already lost, or removed)."""
        member = self.members.pop(actor_id, None)
        if member is None:
            return None
        member.life = dataclasses.replace(member.life, dead_at=time.time(), reason=reason)
        member.info = dataclasses.replace(member.info, state=ActorState.DEAD)
        self.offline[actor_id] = member
        self._changed()
        _end(member)
        return member

    def forget(self, actor_id: str) -> None:
        """A dead actor leaves the status (its replacement serves, or nothing will replace it)."""
        if self.offline.pop(actor_id, None) is not None:
            self._changed()

    def give_up(self, actor_id: str) -> None:
        """Nothing will replace this dead actor: it stays in the status, and requests stop
        waiting for it."""
        member = self.offline.get(actor_id)
        if member is not None:
            member.life = dataclasses.replace(member.life, given_up=True)
            self._changed()

    def report_lost(self, actor_id: str, reason: str, certain: bool = True) -> None:
        """A call to the actor failed as if it were dead (certain: Ray says it died)."""
        if self.on_lost is not None:
            self.on_lost(actor_id, reason, certain)

    def replacing(self, role: Role) -> bool:
        """Whether an actor of the role is on its way: starting, or dead with a replacement to come."""
        return any(m.role is role and not m.life.given_up for m in self.offline.values())

    async def changed(self, timeout_s: float) -> None:
        """Returns when `members` or `offline` changed, or after timeout_s."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def refresh(self, timeout_s: float = 5.0) -> list[ActorReport]:
        """Every live actor's info (role, state, load). A report that fails or times out is a
        missed one; the supervisor hears of it (a dead actor at once, a hung one after a few)."""
        for m in self.offline.values():
            if m.waiting_for and placed(m.handle):
                m.waiting_for = None
        members = list(self.members.values())
        infos = await asyncio.gather(*(asyncio.wait_for(m.handle.info.remote(), timeout_s) for m in members),
                                     return_exceptions=True)
        for m, info in zip(members, infos):
            if isinstance(info, ActorReport):
                m.missed_reports = 0
                m.info = info
            elif isinstance(info, Exception):
                died = isinstance(info, ray.exceptions.RayActorError) and not isinstance(
                    info, ray.exceptions.ActorUnavailableError)
                self.report_lost(m.actor_id, f"its load report failed: {type(info).__name__}", died)
        return [m.info for m in self.members.values()]

    async def close(self) -> None:
        for actor_id in list(self.offline):
            _end(self.offline.pop(actor_id))
        for actor_id in list(self.members):
            member = self.members.pop(actor_id)
            try:
                await member.handle.shutdown.remote()
            except ray.exceptions.RayActorError:
                pass
            _end(member)


async def _ranks_placement(actor_id: str, hw: Hardware, size: int, timeout_s: float | None) -> "PlacementGroup":
    """One bundle holding every tensor-parallel rank's share, once Ray reserved it: on one node,
    and one bundle because Ray makes visible to an actor only the GPUs (and NPUs) of the bundle
    it runs in, while the ranks are the actor's own processes, which inherit its devices."""
    group = placement_group([hw.bundle(size)], strategy="STRICT_PACK", name=f"{actor_id}-ranks")
    try:
        await asyncio.wait_for(group.ready(), timeout_s)
    except BaseException:
        remove_placement_group(group)
        raise
    return group


def _end(member: Member) -> None:
    """Kills the actor (no restart by Ray) and gives its ranks' bundles back."""
    if member.handle is not None:
        try:
            ray.kill(member.handle, no_restart=True)
        except Exception:  # already gone
            pass
    if member.placement is not None:
        remove_placement_group(member.placement)
        member.placement = None
