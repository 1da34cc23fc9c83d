"""Turns a step's logits into one token per sequence, each with its own options."""
from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch

from mesh.engine.sequence import Sequence


@dataclass
class Sampled:
    tokens: list[int]  # one per row; meaningless for the failed rows
    logprobs: list[float] | None  # when any sequence asked for them
    top_logprobs: list[list[tuple[int, float]]] | None  # per row its top_logprobs most likely (id, logprob)
    failed: dict[int, str]  # row -> why it has no token: that sequence fails, the others go on


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> Sampled:
    """logits: fp32 [n, vocab], row i for seqs[i], changed in place.

    Log-probabilities (the chosen token's, and the most likely tokens' for rows that ask)
    are of the model's own distribution, before temperature, top-k or top-p. Greedy rows
    take the argmax; others sample, with a generator derived from the sequence's seed and
    the token's position when it has a seed (see `_generator`). A row with no usable distribution (NaN or infinite logits,
    every token banned, logits that overflow at its temperature) fails its own
    sequence only.
    """
    logprobs = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs for s in seqs) else None
    for i, seq in enumerate(seqs):
        if len(seq.output_token_ids) < seq.params.min_tokens:
            banned = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else set(eos_ids))
            if banned:
                logits[i, list(banned)] = float("-inf")
    top, tokens = logits.max(dim=-1)  # a row's max is NaN if any logit is, -inf if every token is banned
    tops = top.tolist()
    failed = {i: _unusable(v) for i, v in enumerate(tops) if not math.isfinite(v)}
    largest = torch.finfo(logits.dtype).max
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy or i in failed:
            continue
        # With a finite max after temperature, the softmax is finite (its max term is exp(0)).
        if not abs(tops[i] / p.temperature) < largest:
            failed[i] = f"the logits over temperature {p.temperature} overflow"
            continue
        row = logits[i] / p.temperature
        if 0 < p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        # A seeded draw happens where its generator lives (the CPU): the same seed gives the
        # same tokens on every device.
        generator = None if p.seed is None else _generator(p.seed, seq.num_tokens)
        where = probs.device if generator is None else generator.device
        tokens[i] = torch.multinomial(probs.to(where), 1, generator=generator)[0]
    chosen = None if logprobs is None else logprobs[torch.arange(len(seqs)), tokens].tolist()
    return Sampled(tokens.tolist(), chosen, _most_likely(logprobs, seqs), failed)


def _most_likely(logprobs: torch.Tensor | None, seqs: list[Sequence]) -> list[list[tuple[int, float]]] | None:
    """Each row's top_logprobs most likely tokens, most likely first (one topk for the batch)."""
    k = max(s.params.top_logprobs for s in seqs) if logprobs is not None else 0
    if not k:
        return None
    values, ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
    return [list(zip(ids[i][:s.params.top_logprobs], values[i][:s.params.top_logprobs])) for i, s in enumerate(seqs)]


def _unusable(top: float) -> str:
    if math.isnan(top):
        return "the model's logits are NaN"
    if top < 0:
        return "every token is banned (stop_token_ids and EOS are banned until min_tokens)"
    return "the model's logits overflow to inf"


def _generator(seed: int, position: int) -> torch.Generator:
    """The generator of one seeded draw, a function of (seed, position of the new token) and
    of nothing else: a request handed to a decode actor, or re-prefilled elsewhere from its
    prompt and the tokens sent, draws there what it would have drawn in one engine, and a
    step that is run again draws the same again."""
    digest = hashlib.blake2b(struct.pack("<QQ", seed, position), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs  # mass of strictly more likely tokens
    sorted_probs[before >= top_p] = 0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)
