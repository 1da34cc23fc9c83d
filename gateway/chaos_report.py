"""The figures of `pdmesh bench chaos` and its targets, from plain records of what happened:
each request's outcome, each fault as applied, the serving actors sampled over time and the
KV blocks still held at the end.

Every request sent has exactly one outcome: completed (finished with exactly the tokens it
asked for, and, where checked, a single engine's greedy tokens), corrupt (finished, but with
other tokens), failed (a clean error status) or lost (no answer by its deadline). So
sent = completed + corrupt + failed + lost.
"""
from __future__ import annotations

import enum
import statistics
from collections import Counter
from dataclasses import asdict, dataclass

from gateway.chaos_plan import Fault


class Result(str, enum.Enum):
    COMPLETED = "completed"
    CORRUPT = "corrupt"
    FAILED = "failed"
    LOST = "lost"


@dataclass(frozen=True)
class Outcome:
    index: int  # the LoadMix request's
    poison: str  # "" for an innocent request
    result: Result
    status: str  # the gRPC status name; "OK" when the stream ended normally
    sent_s: float  # after the load started
    ended_s: float
    detail: str = ""


@dataclass(frozen=True)
class Applied:
    """One fault as applied: on which actor, and whether the mesh (or the operator API) let it."""
    fault: Fault
    at_s: float
    actor_id: str | None
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Kill:
    at_s: float
    role: str
    actor_id: str
    serving_before: int  # serving actors of the role just before the kill


@dataclass(frozen=True)
class Sample:
    at_s: float
    serving: dict[str, int]  # per role, actors that answer as serving (killed ones never count)


def replacement_s(kill: Kill, samples: list[Sample]) -> float | None:
    """From the kill until the role has as many serving actors as before it; None: never."""
    for s in samples:
        if s.at_s >= kill.at_s and s.serving.get(kill.role, 0) >= kill.serving_before:
            return s.at_s - kill.at_s
    return None


@dataclass(frozen=True)
class Target:
    name: str
    figure: str
    goal: str
    met: bool


@dataclass(frozen=True)
class Report:
    sent: int
    completed: int
    corrupt: int
    failed: int
    lost: int
    failed_by_status: dict[str, int]
    lost_by_status: dict[str, int]
    verified_greedy: int  # completed greedy requests compared with a single engine
    poison_sent: int
    poison_by_status: dict[str, int]  # "OK": served although poisoned
    poison_window_s: float  # until the first fault: a healthy mesh
    innocent_failed: int  # innocent requests of the poison window not completed
    innocent_failed_by_status: dict[str, int]  # the whole run's, faults' victims included
    faults: tuple[Applied, ...]
    replacement_s: tuple[float | None, ...]  # per kill
    leaked_blocks: dict[str, int]  # per live actor, after the load stopped and leases expired
    replace_within_s: float

    @classmethod
    def build(cls, outcomes: list[Outcome], faults: list[Applied], kills: list[Kill], samples: list[Sample],
              leaked_blocks: dict[str, int], verified_greedy: int, replace_within_s: float) -> "Report":
        by = Counter(o.result for o in outcomes)
        window = min((a.at_s for a in faults), default=float("inf"))
        poisoned = [o for o in outcomes if o.poison]
        return cls(
            sent=len(outcomes), completed=by[Result.COMPLETED], corrupt=by[Result.CORRUPT],
            failed=by[Result.FAILED], lost=by[Result.LOST],
            failed_by_status=_count(o.status for o in outcomes if o.result is Result.FAILED),
            lost_by_status=_count(o.status for o in outcomes if o.result is Result.LOST),
            verified_greedy=verified_greedy, poison_sent=len(poisoned),
            poison_by_status=_count(o.status for o in poisoned),
            poison_window_s=window,
            innocent_failed=sum(1 for o in outcomes if not o.poison and o.ended_s < window
                                and o.result is not Result.COMPLETED),
            innocent_failed_by_status=_count(o.status if o.result is not Result.CORRUPT else "OK_WRONG_TOKENS"
                                             for o in outcomes if not o.poison and o.result is not Result.COMPLETED),
            faults=tuple(faults), replacement_s=tuple(replacement_s(k, samples) for k in kills),
            leaked_blocks={a: n for a, n in leaked_blocks.items() if n}, replace_within_s=replace_within_s)

    @property
    def replaced(self) -> list[float]:
        return [s for s in self.replacement_s if s is not None]

    def targets(self) -> list[Target]:
        kills, replaced = len(self.replacement_s), self.replaced
        slowest = max(replaced, default=None)
        if not kills:
            replacement = "no kill"
        elif len(replaced) < kills:
            replacement = f"none for {kills - len(replaced)} of {kills} kills"
        else:
            replacement = f"max {slowest:.1f} s"
        leaked = sum(self.leaked_blocks.values())
        return [
            Target("lost requests", str(self.lost), "0", self.lost == 0),
            Target("completed with wrong tokens", str(self.corrupt), "0", self.corrupt == 0),
            Target("KV blocks leaked", str(leaked), "0", leaked == 0),
            Target("innocent requests failed (poison window)", str(self.innocent_failed), "0",
                   self.innocent_failed == 0),
            Target("kill to serving replacement", replacement, f"< {self.replace_within_s:g} s",
                   len(replaced) == kills and (slowest is None or slowest < self.replace_within_s)),
        ]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["poison_window_s"] = None if self.poison_window_s == float("inf") else self.poison_window_s
        out["faults"] = [{"at_s": round(a.at_s, 3), "kind": a.fault.kind.value, "phase": a.fault.phase,
                          "planned_s": a.fault.at_s, "actor": a.actor_id, "ok": a.ok, "detail": a.detail}
                         for a in self.faults]
        out["replacement_s"] = list(self.replacement_s)
        out["kills"] = len(self.replacement_s)
        out["replaced"] = len(self.replaced)
        out["replacement_median_s"] = statistics.median(self.replaced) if self.replaced else None
        out["replacement_max_s"] = max(self.replaced, default=None)
        out["targets"] = [asdict(t) for t in self.targets()]
        out["targets_met"] = all(t.met for t in self.targets())
        return out


def _count(statuses) -> dict[str, int]:
    return dict(sorted(Counter(statuses).items()))
