"""vLLM's figures for `pdmesh bench engine --vllm-python PY`: run by the Python of a
virtual environment holding vLLM (not pdmesh's: vLLM pins its own torch), so it
imports nothing from pdmesh. Prints one JSON object.

Measured through vLLM's offline API on random prompt token ids, greedy, EOS
ignored, prefix caching off: batch-1 ms per output token, batch-16 ms per decode
step (a run's time less its first token's, over the remaining tokens) and the
offline workload's output tokens/s.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--offline-requests", type=int, default=64)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(1234)
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.prompt_tokens + args.output_tokens,
              enable_prefix_caching=False, seed=0, distributed_executor_backend="uni")

    def run(requests: int, out: int) -> float:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(10, args.vocab) for _ in range(args.prompt_tokens)])
                   for _ in range(requests)]
        params = SamplingParams(temperature=0.0, max_tokens=out, min_tokens=out, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        if sum(len(o.outputs[0].token_ids) for o in outs) != requests * out:
            raise SystemExit("vLLM returned fewer tokens than asked for")
        return elapsed

    def step_ms(batch: int) -> float:
        first = statistics.median(run(batch, 1) for _ in range(args.repeats))
        whole = statistics.median(run(batch, args.output_tokens) for _ in range(args.repeats))
        return (whole - first) / (args.output_tokens - 1) * 1e3

    run(16, args.output_tokens)  # warm-up: compiled graphs, allocator
    result = {"vllm_version": vllm.__version__, "dtype": args.dtype,
              "batch1_ms_per_step": step_ms(1), "batch16_ms_per_step": step_ms(16)}
    offline = statistics.median(run(args.offline_requests, args.output_tokens) for _ in range(2))
    result["offline_tokens_per_s"] = args.offline_requests * args.output_tokens / offline
    print(json.dumps(result))


if __name__ == "__main__":
    main()
