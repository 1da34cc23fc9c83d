"""Live calibration: one model per hardware profile, learnt from each role's measurements."""
import numpy as np
import pytest

from mesh.hardware import Hardware
from mesh.roles import Role
from scenarios.calibration import Calibration, DecodeSample, PrefillSample, TransferSample
from scenarios.controller import Observation, RatioController
from scenarios.perf_model import from_profile
from scenarios.spec import parse_specs

PROFILE = {"name": "p", "source": "test figures", "kv_bytes_per_token": 1024, "kv_capacity_tokens": 100_000,
           "layers": 4, "prefill": {"intercept_s": 0.01, "per_token_s": 1e-4},
           "decode": {"intercept_s": 0.02, "per_seq_s": 1e-3, "per_context_token_s": 1e-7},
           "transfer": {"per_op_s": 1e-5, "bytes_per_s": 1e9}}
NPU, GPU = Hardware(accelerator="910b", npus=1), Hardware(accelerator="h200", num_gpus=1)


def seeded(_accelerator):
    return from_profile(PROFILE)


def test_each_accelerator_learns_its_own_times_and_the_error_falls():
    """NPU prefill runs at a third of the seed's speed: its model learns that, and its recent
    error falls; the GPU's model, fed decode steps at the seed's times, stays as it was."""
    cal, rng = Calibration(seeded, recent=20), np.random.default_rng(0)
    first = None
    for i in range(300):
        tokens = int(rng.integers(500, 8000))
        err = cal.observe(Role.PREFILL, NPU, PrefillSample(tokens, tokens * 1000, 3 * (0.01 + 1e-4 * tokens)))
        first = first if first is not None else err
        b = int(rng.integers(1, 64))
        cal.observe(Role.DECODE, GPU, DecodeSample(b, b * 1000, 0.02 + 1e-3 * b + 1e-7 * b * 1000))
    assert first == pytest.approx(2 / 3, rel=0.05)
    assert cal.error("910b", PrefillSample) < 0.02
    assert cal.model("910b").prefill_s(4000, 0) == pytest.approx(3 * 0.41, rel=0.02)
    assert cal.model("h200").prefill_s(4000, 0) == pytest.approx(0.41)  # no prefill measured there
    assert cal.error("h200", DecodeSample) < 1e-6 and cal.error("h200", PrefillSample) is None


def test_split_hardware_is_modelled_per_role_in_the_controller():
    """A scenario prefilling on NPUs and decoding on GPUs: slower NPU prefill asks for more
    prefill actors, decode's need is the GPU's."""
    spec = parse_specs({"scenarios": [{"name": "s", "model": "m", "slo": {"ttft_s": 2, "tpot_s": 0.05},
                                       "hardware": {"prefill": NPU.model_dump(), "decode": GPU.model_dump()}}]})
    cal = Calibration(seeded)
    obs = Observation("s", 5.0, 2000, 200, None, None, ())
    before, _ = RatioController(spec, {"s": cal.for_scenario(spec[0])}).need(obs)
    for tokens in range(1000, 9000, 50):
        cal.observe(Role.PREFILL, NPU, PrefillSample(tokens, 0, 3 * (0.01 + 1e-4 * tokens)))
    after, _ = RatioController(spec, {"s": cal.for_scenario(spec[0])}).need(obs)
    assert after.prefill == pytest.approx(3 * before.prefill, rel=0.05)
    assert after.decode == pytest.approx(before.decode)


def test_a_sample_from_the_wrong_role_or_without_time_is_refused():
    cal = Calibration(seeded)
    with pytest.raises(ValueError, match="a decode actor does not measure PrefillSamples"):
        cal.observe(Role.DECODE, GPU, PrefillSample(100, 0, 0.1))
    with pytest.raises(ValueError, match="seconds must be above 0"):
        cal.observe(Role.PREFILL, NPU, TransferSample(8, 1000, 0.0))
