"""Fault-injection points for tests: an actor kills its own process at a named point of a
request, so that a test knows exactly where the failure landed (as SGLang's test hooks do),
or stops it there (SIGSTOP, as a stalled process stops) to hold the request mid-flight until
the test resumes it (SIGCONT to the actor's pid); a stop fires once per process.

PDMESH_FAULT holds faults separated by ";", each `<kill|stop>:<point>[=N][@actor=<id>][@request=<id>]`:
  kill:prefill                    a prefill, once the request is queued in the engine
  kill:transfer_after_layers=N    a KV send, after N layers went to the sender (the lease is being written)
  kill:decode_step=K              a decode (or whole-request) stream, before it sends its K-th token
  kill:rank_decode_step=K         the same, on an actor with tensor-parallel ranks: its last worker
                                  rank's process is killed instead (the actor then takes itself down)
`@actor=` and `@request=` scope a fault to one actor id or one request id (exact); the
dispatcher gives a request's retries ids of their own (`<id>.<attempt>`), so a fault scoped
to a request fires on its first attempt only. Pools hand their spec's faults (by default the
gateway's PDMESH_FAULT) to the actors they start.

A fault that fires appends a JSON line {"point", "n", "actor", "request"} to the file named by
PDMESH_FAULT_LOG (when set), flushed to disk before the process dies: the test reads it back.
Without PDMESH_FAULT nothing here runs: every point is one empty-list check.
"""
from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass

ENV = "PDMESH_FAULT"
LOG_ENV = "PDMESH_FAULT_LOG"
POINTS = ("prefill", "transfer_after_layers", "decode_step", "rank_decode_step")
ACTIONS = ("kill", "stop")


@dataclass(frozen=True)
class Fault:
    point: str
    n: int = 0
    actor: str | None = None
    request: str | None = None
    action: str = "kill"

    def matches(self, point: str, n: int, actor: str, request: str) -> bool:
        return (self.point == point and n >= self.n and self.actor in (None, actor)
                and self.request in (None, request))


@dataclass(frozen=True)
class Fired:
    """What a test reads back from the fault log."""
    point: str
    n: int
    actor: str
    request: str


def parse(text: str) -> tuple[Fault, ...]:
    """Faults from a PDMESH_FAULT value; a malformed one raises ValueError naming it."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        head, *scopes = item.split("@")
        action, _, point = head.partition(":")
        name, _, count = point.partition("=")
        if action not in ACTIONS or name not in POINTS or (count and not count.isdigit()):
            raise ValueError(f"bad fault {item!r}: write kill:<point>[=N][@actor=<id>][@request=<id>] "
                             f"(or stop:...) with a point among {', '.join(POINTS)}")
        scope = dict(s.partition("=")[::2] for s in scopes)
        if set(scope) - {"actor", "request"}:
            raise ValueError(f"bad fault {item!r}: scope by @actor=<id> or @request=<id>")
        faults.append(Fault(name, int(count or 0), scope.get("actor"), scope.get("request"), action))
    return tuple(faults)


class FaultPoints:
    """One actor's armed faults."""

    def __init__(self, spec: str, actor_id: str, log_path: str | None = None):
        self.faults = parse(spec)
        self.actor_id = actor_id
        self.log_path = log_path if log_path is not None else os.environ.get(LOG_ENV)
        self.stopped: set[Fault] = set()  # stop faults that fired: each holds its request once

    def reached(self, point: str, request_id: str, n: int = 0, victim: Callable[[], None] | None = None) -> None:
        """Kills this process (or calls `victim`, which kills another), or stops it until a
        SIGCONT, when an armed fault matches (point, n-th layer or step, request)."""
        hit = [f for f in self.faults if f.matches(point, n, self.actor_id, request_id) and f not in self.stopped]
        if not hit:
            return
        self._record(Fired(point, n, self.actor_id, request_id))
        if all(f.action == "stop" for f in hit):
            self.stopped.update(hit)
            os.kill(os.getpid(), signal.SIGSTOP)  # the whole process, its engine thread too, as a stall
            return
        if victim is not None:
            victim()
            return
        os._exit(17)  # as abrupt as a crash: no clean-up, no goodbye to the peers

    def _record(self, fired: Fired) -> None:
        if not self.log_path:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(asdict(fired)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_log(path: str) -> list[Fired]:
    """The faults that fired, in order."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [Fired(**json.loads(line)) for line in f if line.strip()]
