"""Keeps a pool whole: notices a dead actor at once, takes it out of routing, and starts a
replacement with the same scenario, role and hardware.

A death is noticed three ways, whichever comes first:
- Ray fails the `until_stopped` call the supervisor keeps open on every actor the moment the
  actor's process dies (certain);
- a dispatcher's call to the actor fails as an actor death (certain), or as unreachable;
- the actor misses load reports (the gateway's refresh): unreachable or hung.
A certain death is acted on at once; an unreachable actor after `max_missed_reports` in a row
(then it is killed, so a hung process cannot come back half-alive).

Each dead actor gets one replacement at a time: a start that fails or times out is retried
with exponential backoff, up to `max_starts` starts; after that the dead actor stays in the
status with `given_up` (and requests stop waiting for it). What to do and when is
RestartPolicy's (a plain policy: counts and a clock in, decisions out); Supervisor applies it
on a live pool.

Status: a dead actor's info has state DEAD, and its `life` (mesh.api.Life) `dead_at`,
`reason`, `starts` (replacement starts tried) and, after a failed start, `last_error`; its
replacement's info has state STARTING and then SERVING, its life `replaces`, `dead_at`,
`starting_at` and `serving_at` (wall clock, time.time()). The dead entry leaves the status
once its replacement serves.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable

import ray

from mesh.errors import MeshError
from mesh.pool import Member, Pool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    max_starts: int = 5  # starts of one replacement before giving up
    backoff_s: float = 1.0  # wait after the first failed start; doubles after each further one
    max_backoff_s: float = 30.0
    start_timeout_s: float = 600.0  # a start that takes longer (no room on the cluster, a stuck load) failed
    max_missed_reports: int = 3  # unreachable this many times in a row: dead

    def dead(self, certain: bool, missed_reports: int) -> bool:
        return certain or missed_reports >= self.max_missed_reports

    def next_start(self, failed_starts: int, now: float) -> float | None:
        """When to start the replacement after `failed_starts` failed starts; None: give up."""
        if failed_starts >= self.max_starts:
            return None
        if not failed_starts:
            return now
        return now + min(self.max_backoff_s, self.backoff_s * 2 ** (failed_starts - 1))


class Supervisor:
    """Applies a RestartPolicy to one pool, on the event loop that serves the pool."""

    def __init__(self, pool: Pool, policy: RestartPolicy = RestartPolicy(),
                 on_change: Callable[[], None] | None = None, sync_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.pool = pool
        self.policy = policy
        self.on_change = on_change  # called after each death and replacement (health, for one)
        self.sync_s = sync_s  # how often to pick up actors added or lent in by others
        self.clock = clock
        self._watches: dict[str, asyncio.Task] = {}  # actor id -> its open until_stopped call
        self._replacing: dict[str, asyncio.Task] = {}  # dead actor id -> the task replacing it
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.pool.on_lost = self.lost
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self.pool.on_lost == self.lost:
            self.pool.on_lost = None
        tasks = [t for t in (self._task, *self._watches.values(), *self._replacing.values()) if t]
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a task may sit in a Ray call that is slow to give up
            await asyncio.wait(tasks, timeout=5.0)
        self._watches.clear()
        self._replacing.clear()

    def lost(self, actor_id: str, reason: str, certain: bool = True) -> None:
        """A call to the actor failed: dead (certain) or unreachable. Out of routing and
        replaced once the policy calls it dead."""
        member = self.pool.members.get(actor_id)
        if member is None:  # already lost, or removed or lent away on purpose
            return
        if not certain:
            member.missed_reports += 1
        if not self.policy.dead(certain, member.missed_reports):
            return
        dead = self.pool.lose(actor_id, reason if certain else f"{reason} ({member.missed_reports} in a row)")
        log.warning("pool %s: actor %s is dead (%s); starting a replacement", self.pool.spec.scenario,
                    actor_id, reason)
        self._unwatch(actor_id)
        self._replacing[actor_id] = asyncio.create_task(self._replace(dead))
        self._notify()

    async def _run(self) -> None:
        while True:
            self._sync()
            await self.pool.changed(self.sync_s)

    def _sync(self) -> None:
        """One open watch per member: members come and go (added, removed, lent) by others too."""
        for actor_id, member in self.pool.members.items():
            if actor_id not in self._watches:
                self._watches[actor_id] = asyncio.create_task(self._watch(member))
        for actor_id in [a for a in self._watches if a not in self.pool.members]:
            self._unwatch(actor_id)

    def _unwatch(self, actor_id: str) -> None:
        task = self._watches.pop(actor_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _watch(self, member: Member) -> None:
        try:
            await member.handle.until_stopped.remote()  # returns only when it shuts down on purpose
        except ray.exceptions.ActorUnavailableError:
            self._watches.pop(member.actor_id, None)  # watched again at the next sync
            self.lost(member.actor_id, "unreachable", certain=False)
        except ray.exceptions.RayActorError:
            self._watches.pop(member.actor_id, None)
            self.lost(member.actor_id, "its process died")

    async def _replace(self, dead: Member) -> None:
        failed = 0
        try:
            while (at := self.policy.next_start(failed, self.clock())) is not None:
                await asyncio.sleep(max(0.0, at - self.clock()))
                dead.life = dataclasses.replace(dead.life, starts=failed + 1)
                try:
                    member = await self.pool.add(dead.role, dead.hardware, replaces=dead,
                                                 start_timeout_s=self.policy.start_timeout_s)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # no room on the cluster, a failed load, a timeout: try again later
                    failed += 1
                    dead.life = dataclasses.replace(dead.life, last_error=_why(e))
                    log.warning("pool %s: replacing %s failed (start %d): %s", self.pool.spec.scenario,
                                dead.actor_id, failed, dead.life.last_error)
                    continue
                self.pool.forget(dead.actor_id)
                log.info("pool %s: %s replaces %s", self.pool.spec.scenario, member.actor_id, dead.actor_id)
                return
            self.pool.give_up(dead.actor_id)
            log.error("pool %s: gave up replacing %s after %d failed starts", self.pool.spec.scenario,
                      dead.actor_id, failed)
        finally:
            self._replacing.pop(dead.actor_id, None)
            self._notify()

    def _notify(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # a listener's bug must not stop the supervision
                log.exception("the supervisor's on_change listener failed")


def _why(error: Exception) -> str:
    """One line for the status: the actor's own message, not Ray's traceback and actor repr."""
    if isinstance(error, MeshError):
        return f"{error.code}: {error.message}"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
