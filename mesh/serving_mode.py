"""How a scenario's pool serves a request: its serving mode, and in `auto` mode the
conditional-disaggregation choice for each request.

disaggregated: prefill actors prefill, decode actors decode, the KV moves between them.
aggregated:    an aggregated (`both`) actor runs the whole request, its prefill chunked
               into steps shared with its running decodes.
auto:          a pool of prefill and decode actors where a decode actor prefills a request
               itself (local) when its prompt is short, or when the prefill actors are so busy
               that the request would wait longer there than it takes here; long prompts go to
               prefill actors (remote), as Dynamo's conditional disaggregation does.

`ConditionalDisaggregation` is a plain policy: it takes a `PlacementState` (the prompt and
the actors' last load reports) and returns a `Placement` with its reason; the dispatcher puts
both on the request's span. Prefill times come from the actors' measured speed, else from the
performance model's prediction (`prefill_s`, wired in by the gateway: scenarios.conditional).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from mesh.roles import Role


class Mode(str, enum.Enum):
    DISAGGREGATED = "disaggregated"
    AGGREGATED = "aggregated"
    AUTO = "auto"

    def __str__(self) -> str:
        return self.value

    @property
    def roles(self) -> tuple[Role, ...]:
        """The roles a pool in this mode serves with: what the dispatcher plans its requests for,
        and what a switch to it flips the actors to (mesh.pool.Pool.switch_mode)."""
        return (Role.BOTH,) if self is Mode.AGGREGATED else (Role.PREFILL, Role.DECODE)


@dataclass(frozen=True)
class PlacementState:
    """What the choice looks at, for one request."""
    prompt_tokens: int  # prompt and tokens already sent: what a prefill computes
    local_cached_tokens: int  # of those, likely in the local (decode) actor's prefix cache already
    local_tokens_per_s: float  # that actor's measured prefill speed (0: not measured yet)
    prefill_queued_tokens: int  # prompt tokens queued on the least queued prefill actor
    prefill_tokens_per_s: float  # that actor's measured prefill speed (0: not measured yet)


@dataclass(frozen=True)
class Placement:
    local: bool  # True: the decode actor prefills itself; False: a prefill actor does
    reason: str

    @property
    def decision(self) -> str:
        """The metric label and span attribute: local or remote."""
        return "local" if self.local else "remote"


@dataclass(frozen=True)
class ConditionalDisaggregation:
    """Local when the prompt's uncached tokens are at most `local_prefill_tokens`, or when the
    least queued prefill actor's queue alone takes longer than `ttft_s` and prefilling here is
    sooner; remote otherwise."""
    local_prefill_tokens: int = 256
    ttft_s: float = 2.0
    prefill_s: Callable[[int], float] | None = None  # predicted prefill time of n tokens (the perf model)

    def decide(self, s: PlacementState) -> Placement:
        uncached = max(s.prompt_tokens - s.local_cached_tokens, 1)
        if uncached <= self.local_prefill_tokens:
            return Placement(True, f"short prompt: {uncached} uncached tokens, at most {self.local_prefill_tokens} "
                                   "prefill on the decode actor")
        wait = self._seconds(s.prefill_queued_tokens, s.prefill_tokens_per_s)
        remote = wait + self._seconds(s.prompt_tokens, s.prefill_tokens_per_s)
        local = self._seconds(uncached, s.local_tokens_per_s)
        if wait > self.ttft_s and local < remote:
            return Placement(True, f"prefill pool busy: {s.prefill_queued_tokens} tokens queued ({wait:.2f} s, "
                                   f"over the {self.ttft_s:g} s TTFT target); {local:.2f} s here against "
                                   f"{remote:.2f} s there")
        return Placement(False, f"long prompt: {uncached} uncached tokens, over {self.local_prefill_tokens}; "
                                f"prefill actor ready in {wait:.2f} s")

    def _seconds(self, tokens: int, measured_tokens_per_s: float) -> float:
        """How long `tokens` take to prefill: at the measured speed, else as predicted."""
        if not tokens:
            return 0.0
        if measured_tokens_per_s > 0:
            return tokens / measured_tokens_per_s
        return self.prefill_s(tokens) if self.prefill_s is not None else 0.0
