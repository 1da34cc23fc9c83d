"""Tensor parallelism per role in the scenario file: prefill at TP=4 and decode at TP=8 in one
config, each role's actors built at its size, their ranks reserved as one placement group
bundle each."""
from __future__ import annotations

import pytest
import yaml

from mesh.api import EngineConfig
from mesh.hardware import Hardware
from mesh.pool import Pool, PoolSpec
from scenarios.spec import SpecError, parse_specs
from transport import TransportConfig

SPEC = """
scenarios:
  - name: big
    model: llama3-70b
    slo: {ttft_s: 2.0, tpot_s: 0.05}
    hardware:
      prefill: {accelerator: h100, num_gpus: 1, tensor_parallel_size: 4}
      decode: {accelerator: h100, num_gpus: 1, tensor_parallel_size: 8}
"""


def test_prefill_at_tp4_and_decode_at_tp8_in_one_config():
    [spec] = parse_specs(yaml.safe_load(SPEC))
    prefill, decode = spec.hardware["prefill"], spec.hardware["decode"]
    assert (prefill.tensor_parallel_size, decode.tensor_parallel_size) == (4, 8)
    assert decode.bundle() == {"CPU": 1, "GPU": 1}  # each of the 8 ranks' share
    # the decode actor asks for all 8 (it sees only the GPUs Ray gives it; its ranks are its processes)
    assert decode.options(8) == {"num_cpus": 8, "num_gpus": 8} and decode.bundle(8) == {"CPU": 8, "GPU": 8}
    pool = Pool(PoolSpec("big", EngineConfig(model="/models/llama3-70b"), TransportConfig(backend="local"), dict(spec.hardware)))
    assert pool.engine_for(prefill).tensor_parallel_size == 4
    assert (pool.engine_for(decode).tensor_parallel_size, pool.engine_for(decode).device) == (8, "cuda")
    # a role that names no size runs the pool's engine's (pdmesh serve -tp)
    tp2 = Pool(PoolSpec("big", EngineConfig(model="/m", tensor_parallel_size=2), TransportConfig(backend="local")))
    assert tp2.engine_for(Hardware()).tensor_parallel_size == 2


def test_a_bad_size_says_what_to_fix():
    with pytest.raises(SpecError, match="tensor_parallel_size: Input should be greater than or equal to 1"):
        parse_specs(yaml.safe_load(SPEC.replace("tensor_parallel_size: 8", "tensor_parallel_size: 0")))
