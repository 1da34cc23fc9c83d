"""Each scenario's load over the current control interval, counted on every request the
gateway serves: what the ratio controller observes (`scenarios.controller.Observation`).

The gateway sees every request from arrival to its last token, so it measures the load
itself instead of trusting the actors' reports: arrivals, prompt and output lengths, and
whether each request met its scenario's TTFT and TPOT targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from scenarios.controller import ActorView, Observation
from scenarios.spec import SLO


@dataclass
class _Counts:
    arrivals: int = 0
    prompt_tokens: int = 0
    ended: int = 0
    served: int = 0  # ended after a first token
    output_tokens: int = 0  # of the served
    ttft_ok: int = 0
    tpot_ok: int = 0
    kv_short: int = 0  # found no decode KV free on arrival


@dataclass(frozen=True)
class Figures:
    """The last closed interval of one scenario, for operators (`pdmesh status`)."""
    arrival_rps: float = 0.0
    mean_prompt: float = 0.0
    mean_output: float = 0.0
    ttft_attainment: float | None = None
    tpot_attainment: float | None = None
    requests_ended: int = 0


class LoadWindow:
    def __init__(self, slos: dict[str, SLO], clock: Callable[[], float]):
        self.slos, self.clock = slos, clock
        self._counts = {name: _Counts() for name in slos}
        # the last interval's means with traffic: a quiet interval keeps them, so that the
        # controller's smoothing is not dragged toward zero-length requests
        self._means = {name: (0.0, 0.0) for name in slos}
        self._since = clock()
        self.last = {name: Figures() for name in slos}

    def arrived(self, scenario: str, prompt_tokens: int) -> None:
        c = self._counts[scenario]
        c.arrivals += 1
        c.prompt_tokens += prompt_tokens

    def ended(self, scenario: str, ttft_s: float | None, tpot_s: float | None, output_tokens: int,
              kv_short: bool) -> None:
        """A request ended, served or not. ttft_s None: it got no first token (refused for want
        of capacity, or past its deadline), a TTFT miss, whose output says nothing about how long
        outputs are (counted as 0, it would shrink decode's share just when the pool is short);
        tpot_s None: fewer than two tokens."""
        c, slo = self._counts[scenario], self.slos[scenario]
        c.ended += 1
        if ttft_s is not None:
            c.served += 1
            c.output_tokens += output_tokens
        c.ttft_ok += ttft_s is not None and ttft_s <= slo.ttft_s
        c.tpot_ok += tpot_s is None or tpot_s <= slo.tpot_s
        c.kv_short += kv_short

    def close(self, actors: dict[str, tuple[ActorView, ...]]) -> list[Observation]:
        """Ends the interval of every scenario (the next one starts empty); returns the
        observations of those in `actors`, the scenarios under control."""
        now = self.clock()
        elapsed = max(now - self._since, 1e-6)
        self._since = now
        out = []
        for name, c in self._counts.items():
            prompt, output = self._means[name]
            if c.arrivals:
                prompt = c.prompt_tokens / c.arrivals
            if c.served:
                output = c.output_tokens / c.served
            self._means[name] = prompt, output
            ttft = c.ttft_ok / c.ended if c.ended else None
            tpot = c.tpot_ok / c.ended if c.ended else None
            self.last[name] = Figures(c.arrivals / elapsed, prompt, output, ttft, tpot, c.ended)
            if name in actors:
                out.append(Observation(name, c.arrivals / elapsed, prompt, output, ttft, tpot, actors[name],
                                       c.kv_short / c.arrivals if c.arrivals else None))
            self._counts[name] = _Counts()
        return out
