"""What `pdmesh bench serve` sends: each request's arrival time, prompt and output length, from
a trace (simtests.traces: BurstGPT / Azure CSV, Mooncake JSONL) or synthetic (vLLM's `random`
dataset: lengths uniform within --random-range-ratio of their means).

Prompts are token ids of the served model's own vocabulary (special tokens left out), so a
completions request that sends them as `prompt: [ids]` has exactly the planned prompt length
on any OpenAI-compatible server (pdmesh and vLLM both take token-id prompts). Chat requests
need text: the ids are decoded and the text re-encoded until it has the planned length; the
chat template then adds its own tokens, which the server's usage counts.

Arrivals: the trace's own times (times --time-scale) or, with a request rate, gaps drawn from
a gamma distribution (shape = burstiness; 1 is Poisson), as vLLM draws them; an infinite rate
sends everything at once. The same seed gives the same workload, so two servers get the same load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mesh import Tokenizer
from simtests.traces import TraceError, read_trace

TRACE_KINDS = ("burstgpt", "azure", "mooncake")
DATASETS = ("random", *TRACE_KINDS)
VLLM_DEFAULT_PROMPTS = 1000
MIN_WORDS = 100  # vllm bench serve's --num-prompts default for synthetic data


class WorkloadError(ValueError):
    """A workload that cannot be built, with what to fix."""


@dataclass(frozen=True)
class Planned:
    """One request to send: at `at_s` from the run's start."""
    index: int
    at_s: float
    prompt_ids: tuple[int, ...]
    prompt_text: str  # the ids as text, for chat requests
    output_tokens: int


@dataclass(frozen=True)
class Shape:
    """How to build a workload: the dataset, lengths, pacing and seed (vLLM's option names)."""
    dataset_name: str = "random"
    dataset_path: str | None = None
    num_prompts: int | None = None  # None: the whole trace, or 1000 synthetic requests
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    request_rate: float | None = None  # requests/s (inf: all at once); None: a trace's own times, else inf
    burstiness: float = 1.0
    time_scale: float = 1.0  # trace times times this (< 1: more load)
    seed: int = 0
    chat: bool = False  # also build each prompt's text


def build(shape: Shape, tokenizer: Tokenizer) -> list[Planned]:
    """The requests, in arrival order."""
    rng = np.random.default_rng(shape.seed)
    if shape.dataset_name == "random":
        n = VLLM_DEFAULT_PROMPTS if shape.num_prompts is None else shape.num_prompts
        prompts = _lengths(rng, shape.random_input_len, shape.random_range_ratio, n, "--random-input-len")
        outputs = _lengths(rng, shape.random_output_len, shape.random_range_ratio, n, "--random-output-len")
        arrivals = _arrivals(rng, n, math.inf if shape.request_rate is None else shape.request_rate,
                             shape.burstiness)
    elif shape.dataset_name in TRACE_KINDS:
        prompts, outputs, arrivals = _trace(shape, rng)
    else:
        raise WorkloadError(f"--dataset-name {shape.dataset_name!r}: choose one of {', '.join(DATASETS)}")
    vocab = _words(tokenizer) if shape.chat else _plain_ids(tokenizer)
    planned = []
    for i, (p, o, at) in enumerate(zip(prompts, outputs, arrivals)):
        ids = rng.choice(vocab, int(p))
        ids, text = _as_text(tokenizer, ids, int(p)) if shape.chat else (ids, "")
        planned.append(Planned(i, float(at), tuple(int(t) for t in ids), text, int(o)))
    return planned


def _lengths(rng: np.random.Generator, mean: int, ratio: float, n: int, flag: str) -> np.ndarray:
    if mean < 1:
        raise WorkloadError(f"{flag} must be at least 1, got {mean}")
    if not 0 <= ratio < 1:
        raise WorkloadError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    low, high = max(1, math.floor(mean * (1 - ratio))), math.ceil(mean * (1 + ratio))
    return rng.integers(low, high + 1, n)


def _arrivals(rng: np.random.Generator, n: int, rate: float, burstiness: float) -> np.ndarray:
    if not rate > 0:
        raise WorkloadError(f"--request-rate must be positive (inf: all at once), got {rate}")
    if not burstiness > 0:
        raise WorkloadError(f"--burstiness must be positive (1: Poisson), got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.gamma(burstiness, 1 / (rate * burstiness), n)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps)


def _trace(shape: Shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not shape.dataset_path:
        raise WorkloadError(f"--dataset-name {shape.dataset_name} needs --dataset-path (the trace file)")
    try:
        trace = read_trace(shape.dataset_path, shape.time_scale, limit=shape.num_prompts)
    except TraceError as e:
        raise WorkloadError(str(e)) from None
    if trace.kind != shape.dataset_name:
        raise WorkloadError(f"{shape.dataset_path} is a {trace.kind} trace, not {shape.dataset_name}: "
                            f"pass --dataset-name {trace.kind}")
    arrivals = trace.arrival_s if shape.request_rate is None else _arrivals(rng, len(trace), shape.request_rate,
                                                                            shape.burstiness)
    return trace.prompt, trace.output, arrivals


def _plain_ids(tokenizer: Tokenizer) -> np.ndarray:
    """The vocabulary less added (special) tokens: ids any server takes as ordinary text."""
    ids = np.array(sorted(tokenizer.backend.get_vocab(with_added_tokens=False).values()))
    added = {int(i) for i in tokenizer.backend.get_added_tokens_decoder()}
    return ids[~np.isin(ids, list(added))]


def _words(tokenizer: Tokenizer) -> np.ndarray:
    """Tokens that are a space and letters and encode back to themselves: text made of them
    tokenizes as they were drawn (pre-tokenizers split at spaces); all plain ids if too few."""
    plain = _plain_ids(tokenizer)
    words = [i for i in plain.tolist() if (text := tokenizer.decode([i])).startswith(" ") and text[1:].isalpha()
             and tokenizer.encode(text, add_special_tokens=False) == [i]]
    return np.array(words) if len(words) >= MIN_WORDS else plain


def _as_text(tokenizer: Tokenizer, ids: np.ndarray, length: int, tries: int = 10) -> tuple[np.ndarray, str]:
    """Text and its token ids, `length` of them where a few rounds of decode, re-encode and trim
    reach it (merges can shorten or lengthen random text); else the last tried."""
    ids = list(ids)
    for _ in range(tries):
        text = tokenizer.decode(ids)
        again = tokenizer.encode(text, add_special_tokens=False)
        if len(again) == length:
            break
        ids = (again + ids)[:length] if len(again) < length else again[:length]
    return np.array(again), text
