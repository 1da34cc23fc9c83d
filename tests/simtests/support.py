"""What the simulator tests share: idealised cost models and scenario files, built in code."""
from scenarios.perf_model import from_profile


def profile(prefill=(0.0, 1e-4, 0.0), decode=(0.01, 0.0, 0.0), transfer=(0.0, 0.0), bytes_per_s=1e12,
            capacity=10**9, max_batch_tokens=4096, layers=4, block_tokens=16):
    return from_profile({
        "name": "ideal", "source": "test", "kv_bytes_per_token": 1024, "kv_capacity_tokens": capacity,
        "layers": layers, "max_batch_tokens": max_batch_tokens, "block_tokens": block_tokens,
        "prefill": dict(zip(("intercept_s", "per_token_s", "per_token_sq_s"), prefill)),
        "decode": dict(zip(("intercept_s", "per_seq_s", "per_context_token_s"), decode)),
        "transfer": {"intercept_s": transfer[0], "per_op_s": transfer[1], "bytes_per_s": bytes_per_s}})


def scenario(name="s", p=1, d=1, ttft=1e6, tpot=1e6, **extra):
    return {"name": name, "model": "m", "slo": {"ttft_s": ttft, "tpot_s": tpot}, "prefill": p, "decode": d,
            "limits": {"prefill": {"min": 1, "max": 100}, "decode": {"min": 1, "max": 100}}, **extra}
