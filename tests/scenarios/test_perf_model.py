import json

import numpy as np
import pytest

from scenarios.perf_model import ProfileError, builtin, from_bench, from_profile, load_profile

PROFILE = {"name": "p", "source": "test figures", "kv_bytes_per_token": 1024, "kv_capacity_tokens": 100_000,
           "layers": 4, "prefill": {"intercept_s": 0.01, "per_token_s": 1e-4},
           "decode": {"intercept_s": 0.02, "per_seq_s": 1e-3, "per_context_token_s": 1e-7},
           "transfer": {"per_op_s": 1e-5, "bytes_per_s": 1e9}}


def test_profile_predictions():
    m = from_profile(PROFILE)
    assert m.prefill_s(1000, 1e6) == pytest.approx(0.01 + 0.1)
    assert m.decode_step_s(8, 8000) == pytest.approx(0.02 + 0.008 + 0.0008)
    assert m.transfer_ops(100, contiguous=True) == 8
    assert m.transfer_ops(100, contiguous=False) == 8 * 7  # 100 tokens in blocks of 16
    assert m.transfer_s(8, 1e6) == pytest.approx(8e-5 + 1e-3)


def test_capacity_respects_tpot_and_memory():
    m = from_profile(PROFILE)
    cap = m.capacity(1000, 100, tpot_s=0.05)
    # step(B) = 0.02 + B * (1e-3 + 1e-7 * 1050) <= 0.05 -> B <= 27.1
    assert cap.decode_batch == 27
    assert m.decode_step_s(cap.decode_batch, cap.decode_batch * 1050) <= 0.05
    small_memory = from_profile({**PROFILE, "kv_capacity_tokens": 5500})
    assert small_memory.capacity(1000, 100, tpot_s=0.05).decode_batch == 5
    assert cap.prefill_rps == pytest.approx(16 / (0.01 + 16000 * 1e-4))


def test_kv_held_before_decode_lowers_memory_bound_capacity():
    """The lease is taken before prefill: KV held for as long as decoding takes halves the
    requests/s that a memory-bound decode actor carries; a TPOT-bound one is held to its batch."""
    small_memory = from_profile({**PROFILE, "kv_capacity_tokens": 5500})
    free = small_memory.capacity(1000, 100, tpot_s=0.05)
    decoding_s = small_memory.decode_step_s(5, 5 * 1050) * 100
    held = small_memory.capacity(1000, 100, tpot_s=0.05, hold_s=decoding_s)
    assert held.decode_rps == pytest.approx(free.decode_rps / 2)
    roomy = from_profile(PROFILE)
    assert roomy.capacity(1000, 100, 0.05, hold_s=1.0).decode_rps == roomy.capacity(1000, 100, 0.05).decode_rps


def test_online_fit_converges_from_a_wrong_seed():
    m = from_profile({**PROFILE, "decode": {"intercept_s": 0.1, "per_seq_s": 0.0, "per_context_token_s": 0.0}})
    rng = np.random.default_rng(0)
    for _ in range(400):
        b = int(rng.integers(1, 64))
        ctx = b * int(rng.integers(100, 4000))
        m.observe_decode_step(b, ctx, 0.005 + 2e-4 * b + 3e-8 * ctx + rng.normal(0, 1e-4))
    a, pb, pc = m.decode.coef
    assert a == pytest.approx(0.005, rel=0.1) and pb == pytest.approx(2e-4, rel=0.1)
    assert pc == pytest.approx(3e-8, rel=0.1)


def test_seed_from_bench_json():
    engine = {"model": "/tmp/small", "rows": [
        {"what": "prefill 8 x 512", "pdmesh": 2000.0},
        {"what": "decode batch 1", "pdmesh": 50.0}, {"what": "decode batch 16", "pdmesh": 400.0},
        {"what": "decode batch 64", "pdmesh": 800.0}, {"what": "offline 64 x 256 in / 64 out", "pdmesh": 600.0}]}
    mesh = {"results": {"disaggregated 1P:1D": {"transfer_gbps_p50": 2.0}}}
    m = from_bench(engine, mesh, kv_bytes_per_token=12288, kv_capacity_tokens=40000, layers=12)
    assert m.prefill_s(512, 0) == pytest.approx(512 / 2000)
    assert m.decode_step_s(16, 16 * 144) == pytest.approx(16 / 400, rel=0.15)
    assert m.transfer_s(0, 2e9) == pytest.approx(1.0)
    assert "pdmesh bench engine + mesh" in m.source
    with pytest.raises(ProfileError, match="no 'rows'"):
        from_bench({"model": "x"}, kv_bytes_per_token=1, kv_capacity_tokens=1, layers=1)


@pytest.mark.parametrize("change, message", [
    ({"source": None}, "missing 'source'"),
    ({"prefill": {"per_token": 1}}, "unknown keys"),
    ({"decode": {"intercept_s": -1}}, "must not be negative"),
    ({"transfer": {"per_op_s": 1e-6}}, "bytes_per_s"),
    ({"decode": {"intercept_s": "fast"}}, "must be a number"),
])
def test_bad_profiles(change, message):
    data = {k: v for k, v in {**PROFILE, **change}.items() if v is not None}
    with pytest.raises(ProfileError, match=message):
        from_profile(data)


def test_profile_files(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PROFILE))
    assert load_profile(path).name == "p"
    path.write_text("{")
    with pytest.raises(ProfileError, match="cannot parse"):
        load_profile(path)
    assert "H100" in builtin("llama3-8b-h100").source
    with pytest.raises(ProfileError, match="known: .*llama3-8b-h100"):
        builtin("nope")
