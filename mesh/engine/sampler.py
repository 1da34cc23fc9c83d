"""Turns a step's logits into one token per sequence, each with its own options."""
from __future__ import annotations

import torch

from mesh.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence],
           eos_ids: tuple[int, ...]) -> tuple[list[int], list[float] | None]:
    """logits: fp32 [n, vocab], row i for seqs[i], changed in place. Returns tokens and, when any
    sequence asked for them, their log-probabilities.

    Log-probabilities are of the model's own distribution, before temperature,
    top-k or top-p. Greedy rows take the argmax; others sample with the
    sequence's generator when it has a seed, so results do not depend on the batch.
    """
    logprobs = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs for s in seqs) else None
    for i, seq in enumerate(seqs):
        if len(seq.output_token_ids) < seq.params.min_tokens:
            banned = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else set(eos_ids))
            if banned:
                logits[i, list(banned)] = float("-inf")
    tokens = logits.argmax(dim=-1)
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if 0 < p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        # A seeded sequence draws where its generator lives (the CPU): the same seed gives the
        # same tokens on every device.
        where = seq.generator.device if seq.generator is not None else probs.device
        tokens[i] = torch.multinomial(probs.to(where), 1, generator=seq.generator)[0]
    if logprobs is None:
        return tokens.tolist(), None
    return tokens.tolist(), logprobs[torch.arange(len(seqs)), tokens].tolist()


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs  # mass of strictly more likely tokens
    sorted_probs[before >= top_p] = 0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)
