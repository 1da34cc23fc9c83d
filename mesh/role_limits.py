"""The rule every change to a pool's roles follows: operator flips, drains, removals, adds and
lends, and the ratio controller's flips and lends.

- Each role keeps its count of serving actors within the scenario's [min, max].
- An actor only takes a role on the hardware the scenario runs that role on (an NPU prefill
  actor does not become a decoder where the scenario decodes on GPUs).

A change that leaves a role no further outside its limits than it was is allowed, so a pool
that started below a minimum may still grow toward it. A plain policy without Ray: it takes
the pool's roles and one proposed change and returns a Verdict; the caller applies the
change or answers with the reason (an operator's --force overrides it, with a warning).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Mapping, Protocol

UNBOUNDED = 1_000_000  # the largest count a role may have when its limits give no max


class Limits(Protocol):
    """A role's bounds: scenarios.spec.RoleLimits, or Bounds for pools without a scenario file."""
    min: int
    max: int


@dataclass(frozen=True)
class Bounds:
    min: int = 0
    max: int = UNBOUNDED


def device_for(num_gpus: float, npus: float) -> str:
    """The device kind an actor asking for these resources runs on."""
    return "npu" if npus else "cuda" if num_gpus else "cpu"


def device_kind(device: str) -> str:
    """"cuda:0" -> "cuda": the kind of an actor's torch device ("" when not known)."""
    return device.split(":")[0]


@dataclass(frozen=True)
class Change:
    """One actor leaving role `old` (None: it served none) for role `new` (None: it stops
    serving). `device`: the kind it runs on ("" when not known: no hardware check)."""
    actor_id: str
    old: str | None
    new: str | None
    device: str = ""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""  # when refused: which rule, and how to change it


ALLOWED = Verdict(True)


@dataclass(frozen=True)
class PoolRoles:
    """What the rule looks at, for one scenario: its actors serving each role, its limits per
    role (a role without limits has none), and the device kind it runs each role on (a role
    without one runs anywhere)."""
    scenario: str
    serving: Mapping[str, int]
    limits: Mapping[str, Limits]
    devices: Mapping[str, str]

    def judge(self, change: Change) -> Verdict:
        """Whether `change` keeps this pool within its rules."""
        if change.new is not None and change.new != change.old:
            want = self.devices.get(change.new)
            if want and change.device and change.device != want:
                return Verdict(False, f"actor {change.actor_id} runs on {change.device}, but scenario "
                                      f"{self.scenario!r} runs {change.new} on {want} (hardware.{change.new} in "
                                      f"its scenario file): start a {change.new} actor there instead "
                                      f"(`pdmesh add {self.scenario} {change.new}`)")
        after = self.after(change)
        for role in {change.old, change.new} - {None}:
            lim, before, n = self.limits.get(role), self.serving.get(role, 0), after.serving.get(role, 0)
            if lim is None:
                continue
            if n < lim.min and n < before:
                return Verdict(False, f"scenario {self.scenario!r} would have {n} serving {role} actor(s), below "
                                      f"its minimum of {lim.min} (limits.{role}.min in its scenario file): start "
                                      f"another {role} actor first (`pdmesh add {self.scenario} {role}`), or "
                                      f"lower limits.{role}.min")
            if n > lim.max and n > before:
                return Verdict(False, f"scenario {self.scenario!r} would have {n} serving {role} actors, above "
                                      f"its maximum of {lim.max} (limits.{role}.max in its scenario file): flip "
                                      f"or remove a {role} actor first, or raise limits.{role}.max")
        return ALLOWED

    def after(self, change: Change) -> "PoolRoles":
        """The pool once `change` is made."""
        serving = Counter(self.serving)
        if change.old is not None:
            serving[change.old] -= 1
        if change.new is not None:
            serving[change.new] += 1
        return replace(self, serving=serving)


class RoleLimitError(Exception):
    """A change the rule refused; the message says which rule and how to change it."""
