"""Prefill admission: answer an offer at once from the actor's own state.

A prefill actor accepts a request only when its predicted first-token time
(the prompt tokens already queued ahead of it plus its own, at the measured
prefill speed) fits the scenario's TTFT budget and the request's deadline.
An idle actor always accepts: no other actor could start the request sooner.

An offer may say how much of the prompt the actor likely holds in its prefix cache
(the dispatcher's guess, mesh.prefix_index): only the rest counts, and the actor
accepts only when the request would be done sooner than an idle actor computing the
whole prompt (its queue is shorter than what its cache saves), so that a prefix many
requests share does not queue them all on its holder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.api import OfferReply


@dataclass(frozen=True)
class PrefillLoad:
    queued_tokens: int  # prompt tokens accepted and not yet prefilled
    queued_requests: int
    tokens_per_s: float  # measured prefill speed


@dataclass(frozen=True)
class Offer:
    prompt_tokens: int
    ttft_budget_s: float
    time_left_s: float = math.inf  # until the request's deadline
    cached_tokens: int = 0  # of the prompt, likely in this actor's prefix cache


@dataclass(frozen=True)
class PrefillAdmission:
    max_queued_requests: int = 256

    def decide(self, load: PrefillLoad, offer: Offer) -> OfferReply:
        rate = max(load.tokens_per_s, 1.0)
        wait = load.queued_tokens / rate
        computed = max(1, offer.prompt_tokens - offer.cached_tokens)  # the last token always runs
        ttft = wait + computed / rate
        if load.queued_requests == 0:
            return OfferReply(True, "idle", predicted_ttft_s=ttft)
        if load.queued_requests >= self.max_queued_requests:
            return OfferReply(False, "queue full", retry_after_s=wait, predicted_ttft_s=ttft)
        if offer.cached_tokens and ttft > offer.prompt_tokens / rate:
            return OfferReply(False, f"holds the prefix, but its queue ({wait:.3f}s) costs more than the cache "
                            "saves", retry_after_s=wait, predicted_ttft_s=ttft)
        if ttft > min(offer.ttft_budget_s, offer.time_left_s):
            return OfferReply(False, f"predicted TTFT {ttft:.3f}s over the budget", retry_after_s=wait,
                            predicted_ttft_s=ttft)
        return OfferReply(True, "fits the TTFT budget", predicted_ttft_s=ttft)
