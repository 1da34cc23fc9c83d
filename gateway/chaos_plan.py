"""What `pdmesh bench chaos` does, decided up front from a seed: which fault at which time
(the schedule) and which requests (the load mix). Plain objects, no Ray and no gRPC, so that
the same seed gives the same plan and the plan can be tested alone.

Invariants of a schedule: faults are sorted by time, at most one per slot of `every_s`
seconds; none before `quiet_s` (the poison window: a healthy mesh, where an innocent request
that fails was hurt by a poisoned one) and none in the last `tail` of the run (so that the
mesh settles before the leak check). A kill names the phase it lands in; "now" (whatever the
actor is doing) is the one every build has; fault-injection points may add others.
"""
from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field


class FaultKind(str, enum.Enum):
    KILL_PREFILL = "kill_prefill"
    KILL_DECODE = "kill_decode"
    FLIP = "flip"  # an actor of the larger role serves the other one
    DRAIN = "drain"  # an actor drains, then serves its role again (an operator's maintenance)

    @property
    def killed_role(self) -> str | None:
        return {FaultKind.KILL_PREFILL: "prefill", FaultKind.KILL_DECODE: "decode"}.get(self)


@dataclass(frozen=True)
class Fault:
    at_s: float  # after the load starts
    kind: FaultKind
    pick: float  # in [0, 1): which of the candidate actors, sorted by id
    phase: str = "now"  # kills only: where in a request the actor dies

    def target(self, candidates: list[str]) -> str | None:
        ordered = sorted(candidates)
        return ordered[int(self.pick * len(ordered))] if ordered else None


@dataclass(frozen=True)
class Schedule:
    faults: tuple[Fault, ...]
    quiet_s: float  # no fault before this: the poison window

    @classmethod
    def random(cls, seed: int, seconds: float, every_s: float, phases: tuple[str, ...] = ("now",),
               quiet_share: float = 0.25, tail: float = 0.15) -> "Schedule":
        if seconds <= 0 or every_s <= 0 or not phases:
            raise ValueError("a schedule needs seconds > 0, every_s > 0 and at least one kill phase")
        rng = random.Random(seed)
        quiet, end = seconds * quiet_share, seconds * (1 - tail)
        slots = max(1, int((end - quiet) // every_s))
        width = (end - quiet) / slots
        faults = []
        for i in range(slots):
            kind = rng.choice(list(FaultKind))
            phase = rng.choice(phases) if kind.killed_role else "now"
            faults.append(Fault(round(quiet + (i + rng.random()) * width, 3), kind, rng.random(), phase))
        return cls(tuple(faults), quiet)


# Sampling options that must fail only their own request (issue 14); each expressible over gRPC.
POISONS = {
    "temperature_1e-300": {"temperature": 1e-300},  # NaN probabilities in the sampler
    "stop_id_beyond_vocab": {"stop_token_ids": [2**32 - 1]},
}


@dataclass(frozen=True)
class LoadRequest:
    index: int
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: dict = field(default_factory=dict)  # SamplingOptions fields besides max_tokens
    poison: str = ""  # a POISONS key, or "" for an innocent request

    @property
    def greedy(self) -> bool:
        return not self.poison and self.sampling.get("temperature") == 0


@dataclass(frozen=True)
class LoadMix:
    """The i-th request of the run: a random prompt and length; every `poison_every`-th one
    carries a poison, the other innocent ones alternate greedy and seeded sampling. Every
    request ignores EOS, so a completed one has exactly max_tokens tokens."""
    seed: int
    vocab_size: int
    prompt_tokens: tuple[int, int] = (16, 128)
    output_tokens: tuple[int, int] = (4, 32)
    poison_every: int = 10  # 0: no poison

    def request(self, i: int) -> LoadRequest:
        rng = random.Random(self.seed * 1_000_003 + i)
        prompt = tuple(rng.randrange(10, self.vocab_size) for _ in range(rng.randint(*self.prompt_tokens)))
        max_tokens = rng.randint(*self.output_tokens)
        if self.poison_every and i % self.poison_every == self.poison_every - 1:
            name = sorted(POISONS)[(i // self.poison_every) % len(POISONS)]
            return LoadRequest(i, prompt, max_tokens, {"ignore_eos": True, **POISONS[name]}, name)
        sampling = {"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.8, "seed": rng.randrange(2**31)}
        return LoadRequest(i, prompt, max_tokens, {"ignore_eos": True, **sampling})
