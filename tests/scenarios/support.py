"""What the scenarios tests share: a performance profile with round figures."""

PROFILE = {"name": "p", "source": "test figures", "kv_bytes_per_token": 1024, "kv_capacity_tokens": 100_000,
           "layers": 4, "prefill": {"intercept_s": 0.01, "per_token_s": 1e-4},
           "decode": {"intercept_s": 0.02, "per_seq_s": 1e-3, "per_context_token_s": 1e-7},
           "transfer": {"per_op_s": 1e-5, "bytes_per_s": 1e9}}
