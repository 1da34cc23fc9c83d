"""Plain helpers shared by the engine tests (fixtures live in tests/conftest.py)."""
from __future__ import annotations

from collections import defaultdict

import torch

from mesh.engine.sampling_params import SamplingParams

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # every model family the tiny checkpoints come in

# Prompts of clearly different lengths (about 3, 14, 30 and 42 tokens with the tiny tokenizers),
# so a batch mixes short and chunked prefills, and sequences span many 4-token blocks.
PROMPTS = (
    "import",
    "def add(a, b):\n    return a + b",
    "class Queue:\n    def __init__(self, maxsize=0):\n        self.maxsize = maxsize",
    "for i, line in enumerate(lines):\n    if not line.strip():\n        continue\n"
    "    print(i, line.rstrip())",
)


class StepRecorder:
    """Observes a real engine's steps without changing them.

    Wraps `runner.execute` and `model.logits` on this one engine instance to keep,
    for every step, the scheduled batch's shape and the fp32 logits rows the sampler
    was given (cloned, since the sampler edits them in place).
    """

    def __init__(self, engine):
        self.engine = engine
        self.logits: dict[str, list[torch.Tensor]] = defaultdict(list)  # request id -> one row per token
        self.batches: list[tuple[int, list[int]]] = []  # (decodes, prefill chunk sizes) per step
        self.max_block_runs = 0  # most runs of consecutive block ids one scheduled sequence held
        self._rows = None

    def __enter__(self) -> "StepRecorder":
        runner, model = self.engine.runner, self.engine.model
        execute, logits = runner.execute, model.logits

        def recording_logits(hidden):
            rows = logits(hidden)
            self._rows = rows.to("cpu", copy=True)
            return rows

        def recording_execute(batch, *args, **kwargs):
            self.batches.append((len(batch.decodes), [n for _, n in batch.prefills]))
            for seq in batch.decodes + [s for s, _ in batch.prefills]:
                self.max_block_runs = max(self.max_block_runs, count_runs(seq.block_ids))
            out = execute(batch, *args, **kwargs)
            for seq, row in zip(out.seqs, self._rows if out.seqs else []):
                self.logits[seq.request_id].append(row)
            return out

        runner.execute, model.logits = recording_execute, recording_logits
        return self

    def __exit__(self, *exc) -> None:
        del self.engine.runner.execute, self.engine.model.logits

    def stacked(self, request_id: str) -> torch.Tensor:
        return torch.stack(self.logits[request_id])

    @property
    def mixed_steps(self) -> int:
        """Steps that ran decodes and prefill chunks together."""
        return sum(1 for decodes, chunks in self.batches if decodes and chunks)


def count_runs(block_ids: list[int]) -> int:
    """How many runs of consecutive ids the list is made of."""
    return sum(1 for i, b in enumerate(block_ids) if i == 0 or b != block_ids[i - 1] + 1)


def run_staggered(engine, prompts, params, join_after: int = 3) -> dict[str, list[int]]:
    """Adds the first half of the prompts, runs `join_after` steps, adds the rest, runs to the end.

    Later prompts prefill while earlier ones decode, so steps mix both. Returns the
    output token ids per request id, in prompt order.
    """
    half = len(prompts) // 2
    rids = [engine.add_request(p, params) for p in prompts[:half]]
    outputs: dict[str, list[int]] = {}
    for _ in range(join_after):
        for o in engine.step():
            outputs.setdefault(o.request_id, []).extend(o.token_ids)
    rids += [engine.add_request(p, params) for p in prompts[half:]]
    for o in drain(engine):
        outputs.setdefault(o.request_id, []).extend(o.token_ids)
    return {rid: outputs[rid] for rid in rids}


def prompt(n: int, start: int = 100) -> list[int]:
    """A prompt of exactly n token ids."""
    return list(range(start, start + n))


def drain(engine, max_steps: int = 2000):
    """Steps the engine until no request is left; fails instead of hanging."""
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return
        yield from engine.step()
    raise AssertionError(f"engine still has unfinished requests after {max_steps} steps")


def collect(engine, outputs: dict[str, list[int]], steps: int | None = None) -> None:
    """Runs `steps` steps (or to the end), appending each request's new tokens."""
    if steps is None:
        outputs_of_steps = drain(engine)
    else:
        outputs_of_steps = (o for _ in range(steps) for o in engine.step())
    for o in outputs_of_steps:
        outputs.setdefault(o.request_id, []).extend(o.token_ids)


@torch.inference_mode()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """transformers' fp32 logits [len, vocab] for one unpadded sequence."""
    return model(torch.tensor([token_ids])).logits[0].float()


@torch.inference_mode()
def hf_greedy(model, token_ids: list[int], n: int) -> list[int]:
    """transformers' greedy `generate` of exactly n new tokens (EOS banned until then)."""
    out = model.generate(torch.tensor([token_ids]), attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=model.generation_config.eos_token_id)
    return out[0, len(token_ids):].tolist()

FP32_ATOL = 1e-3


def greedy(n: int) -> SamplingParams:
    # min_tokens bans EOS like transformers' min_new_tokens, so both always make n tokens.
    return SamplingParams(max_tokens=n, temperature=0, min_tokens=n)


def run_and_compare(engine, hf, n_tokens: int, atol: float, prompts=PROMPTS) -> StepRecorder:
    """Runs the prompts staggered through the engine and checks every sampled step's logits
    (the prefill's last position, then each decode step) against transformers' on the same tokens."""
    prompt_ids = [engine.tokenizer.encode(p) for p in prompts]
    with StepRecorder(engine) as rec:
        outputs = run_staggered(engine, prompt_ids, greedy(n_tokens))
    for ids, (rid, out) in zip(prompt_ids, outputs.items()):
        assert len(out) == n_tokens
        # Row k of the reference predicts output token k from the prompt and outputs[:k].
        ref = hf_logits(hf, ids + out)[len(ids) - 1:-1]
        diff = (rec.stacked(rid) - ref).abs().max().item()
        assert diff <= atol, f"prompt of {len(ids)} tokens: max |logit diff| {diff:.2e} > {atol}"
    return rec
