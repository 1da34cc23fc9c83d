"""The auto mode's conditional-disaggregation policy (mesh.placement) for one scenario, its
thresholds from the scenario's SLO and the performance model.

A short prompt is one whose prefill on a decode actor takes at most one TPOT target: the
running decodes there wait about that long once, which the TPOT goal absorbs. The scenario's
`local_prefill_tokens`, when given, overrides it.
"""
from __future__ import annotations

from mesh.placement import ConditionalDisaggregation
from scenarios.perf_model import PerfModel
from scenarios.spec import ScenarioSpec


def conditional_for(spec: ScenarioSpec, model: PerfModel) -> ConditionalDisaggregation:
    def prefill_s(tokens: int) -> float:
        return model.prefill_s(tokens, tokens * tokens)

    local = spec.local_prefill_tokens
    if local is None:
        local = short_prompt_tokens(prefill_s, spec.slo.tpot_s, model.max_batch_tokens)
    return ConditionalDisaggregation(local, spec.slo.ttft_s, prefill_s)


def short_prompt_tokens(prefill_s, budget_s: float, most: int) -> int:
    """The longest prompt (up to `most` tokens) that prefills within budget_s: prefill time
    grows with the prompt, so a bisection finds it."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prefill_s(mid) <= budget_s:
            lo = mid
        else:
            hi = mid - 1
    return lo
