"""A request as the dispatcher (mesh.dispatch) runs it: the caller's Request, each Attempt of
it, and the Events its span records.

An attempt after the first continues the request where its stream stopped: its actor computes
the prompt and every token already sent (`ActorRequest.token_ids` is what the KV covers), and
it runs under its own id (`<id>.<attempt>`), so that nothing an actor still holds for an
earlier attempt can clash with it. The first attempt's offers stop at the admission deadline;
a retry's, and any wait for an actor, only at the request's end.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mesh.api import ActorRequest, SamplingParams


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    deadline: float = float("inf")  # the request's end, on the dispatcher's clock
    ttft_budget_s: float | None = None
    trace_context: dict | None = None  # W3C headers of the caller's span: the actors' spans hang under it
    admission_deadline: float = float("inf")  # the first attempt's offers stop here (or at `deadline`)
    tpot_s: float | None = None  # the scenario's TPOT target: decode actors where it would be met go first


@dataclass(frozen=True)
class Attempt:
    """One attempt of a request: what the actors are handed, and its bounds on the
    dispatcher's clock."""
    request: ActorRequest
    deadline: float  # offers stop here: the admission deadline on a first attempt
    end: float  # the request's end
    ttft_budget_s: float | None
    tpot_s: float | None = None  # the request's TPOT target (None: decode actors by room alone)

    @classmethod
    def of(cls, req: Request, sent: list[int], attempt: int) -> Attempt:
        """Attempt number `attempt` (0: the first) of the request as it stands: its prompt and
        the tokens already sent, which the next actor computes with the prompt and goes on from
        exactly as if the request never moved (max/min_tokens count them, text held back for
        stop strings is not lost, seeded draws go on)."""
        request = ActorRequest(req.request_id if not attempt else f"{req.request_id}.{attempt}",
                               req.prompt_token_ids, req.params, list(sent), req.trace_context)
        return cls(request, min(req.admission_deadline, req.deadline) if not attempt else req.deadline,
                   req.deadline, req.ttft_budget_s, req.tpot_s)


@dataclass
class Event:
    """Something worth a span event: an offer, a rejection, a retry, a transfer."""
    name: str
    attributes: dict = field(default_factory=dict)
