"""Fault injection for tests, as SGLang injects faults by configuration: the model step of
chosen requests raises part-way, once the first layer has written its KV, so that a test
knows where a step failed and can check that only those requests failed and that their
batch-mates' output is exactly that of a clean run."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mesh.engine.sequence import Sequence


class InjectedFault(RuntimeError):
    """The failure a fault point raises."""


@dataclass(frozen=True)
class StepFaults:
    after_tokens: Mapping[str, int]  # request id -> each step of it raises once it has this many output tokens

    def check(self, seqs: Iterable[Sequence]) -> None:
        hit = [s.request_id for s in seqs if len(s.output_token_ids) >= self.after_tokens.get(s.request_id, 1 << 62)]
        if hit:
            raise InjectedFault(f"fault injected into the step of request(s) {', '.join(hit)}")
