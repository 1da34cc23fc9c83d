"""Per-request sampling options, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.engine.errors import RequestError


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite int or float (one that is a float, too: 10**400 is not)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


# Below this, logits / temperature overflow to inf and the probabilities to NaN (1e-300 does).
# vLLM raises temperatures under 1e-2 to 1e-2 for that reason; we refuse them instead, so
# that the client learns its value was not used. 0 (greedy) is what such a value means.
MIN_TEMPERATURE = 1e-2
SEED_LIMIT = 2**63  # non-negative int64: what the gRPC API carries (torch would take up to 2**64)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs, and vLLM's default max_logprobs


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
    top_logprobs: int = 0  # and the k most likely tokens' (needs logprobs)

    def __post_init__(self):
        # Lists are accepted for convenience and frozen into tuples.
        for name in ("stop_token_ids", "stop"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            if not isinstance(value, (list, tuple)):
                raise RequestError(f"{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        checks = [
            (_is_int(self.max_tokens) and self.max_tokens > 0,
             f"max_tokens must be a positive integer, got {self.max_tokens!r}"),
            (_is_number(self.temperature) and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE),
             f"temperature must be a number >= 0: 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
             f"got {self.temperature!r}"),
            (_is_int(self.top_k) and self.top_k >= 0,
             f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}"),
            (_is_number(self.top_p) and 0 < self.top_p <= 1,
             f"top_p must be a number in (0, 1], got {self.top_p!r}"),
            (self.seed is None or (_is_int(self.seed) and 0 <= self.seed < SEED_LIMIT),
             f"seed must be an integer in [0, 2**63), got {self.seed!r}"),
            # < the vocabulary size is checked where it is known (the engine, the gateway)
            (all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must be non-negative integers, got {list(self.stop_token_ids)[:5]}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be between 0 and max_tokens, got {self.min_tokens}"),
            (_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}"),
            (self.logprobs or not self.top_logprobs, "top_logprobs needs logprobs: set logprobs too"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
