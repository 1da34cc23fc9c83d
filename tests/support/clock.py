"""The tests' one fake clock, for every policy and table that takes a clock (a callable that
returns seconds): time moves only when the test moves it."""
from __future__ import annotations


class FakeClock:
    """clock() -> `now`; the test sets or advances `now`. With `step`, each reading also moves
    the clock on by `step` seconds (a clock that ticks once per look)."""

    def __init__(self, now: float = 0.0, step: float = 0.0) -> None:
        self.now = now
        self.step = step

    def __call__(self) -> float:
        now = self.now
        self.now += self.step
        return now
