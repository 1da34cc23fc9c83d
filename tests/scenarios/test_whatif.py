"""What-if predictions with the performance model: the split that fits the load meets more
of the SLO, overload misses, and the controller's split for the mean load."""
import numpy as np
import pytest

from scenarios.perf_model import from_profile
from scenarios.spec import SLO, ScenarioSpec
from scenarios.whatif import predict, suggest
from tests.scenarios.support import PROFILE

SPEC = ScenarioSpec(name="chat", model="m", slo=SLO(ttft_s=2.0, tpot_s=0.05))
MODEL = from_profile(PROFILE)


def trace(rate: float, prompt: int, output: int, seconds: float = 600.0):
    n = int(rate * seconds)
    return np.arange(n) / rate, np.full(n, prompt), np.full(n, output)


def test_prompt_heavy_load_is_met_with_more_prefill():
    arrivals, prompt, output = trace(5.0, 4000, 20)  # each prefill actor carries ~2.5/s
    poor, good = (predict(arrivals, prompt, output, SPEC, MODEL, p, d) for p, d in ((1, 3), (3, 1)))
    assert poor.prefill_utilisation_max > 1 and poor.slo_attainment == 0 and poor.overloaded_share == 1
    assert good.prefill_utilisation_max < 1 and good.slo_attainment == 1
    assert good.served_rps == pytest.approx(5.0, rel=0.01) and poor.served_rps < good.served_rps
    assert good.output_tokens_per_s == pytest.approx(100, rel=0.01)
    s = suggest(prompt, output, 5.0, SPEC, MODEL, 4)
    assert (s.prefill, s.decode) == (3, 1) and s.prefill_needed > s.decode_needed


def test_output_heavy_load_is_met_with_more_decode():
    arrivals, prompt, output = trace(1.5, 200, 800)
    poor, good = (predict(arrivals, prompt, output, SPEC, MODEL, p, d) for p, d in ((3, 1), (1, 3)))
    assert poor.decode_utilisation_max > 1 and good.decode_utilisation_max < poor.decode_utilisation_max
    assert good.slo_attainment > poor.slo_attainment
    s = suggest(prompt, output, 1.5, SPEC, MODEL, 4)
    assert (s.prefill, s.decode) == (1, 3)


def test_a_split_needs_both_roles():
    with pytest.raises(ValueError, match="at least one actor of each role"):
        predict(*trace(1.0, 100, 10), SPEC, MODEL, 0, 2)
