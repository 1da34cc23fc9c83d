"""Per-request sampling options, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass

from mesh.engine.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    seed: int | None = None  # a seed makes sampling reproducible whatever the batch
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop tokens are ignored before this many tokens
    logprobs: bool = False  # report the chosen token's log-probability

    def __post_init__(self):
        # Lists are accepted for convenience and frozen into tuples.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens > 0,
             f"max_tokens must be a positive integer, got {self.max_tokens!r}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0,
             f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be between 0 and max_tokens, got {self.min_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
