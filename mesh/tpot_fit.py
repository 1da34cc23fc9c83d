"""Live dispatch's TPOT prediction for decode placement: whether an attempt would meet its TPOT
target on a decode actor (mesh.routing.meets_tpot), by what the decode actors last reported.
The router's `decode_order` puts the actors where it would first; the simulator predicts the
same from its modelled actors (simtests.decode_placement).

A plain function of the attempt, the reports and the performance model's transfer time: no Ray.
"""
from __future__ import annotations

from typing import Callable, Sequence

from mesh.attempt import Attempt
from mesh.routing import Candidate, ForwardOnRejection, meets_tpot


def tpot_fit(router: ForwardOnRejection, step: Attempt, decode: Sequence[Candidate],
             transfer_s: Callable[[int], float] | None) -> Callable[[Candidate], bool] | None:
    """Whether the attempt would meet its TPOT target on one of the `decode` actors: its KV transfer
    as transfer_s(prompt tokens) predicts it, then the tokens it has left, each at the actor's last
    measured step time. None when there is nothing to predict it by (no target or no transfer
    model), or when the decode actors' KV is short by their last reports (`places_by_tpot`)."""
    loads = [m.info.load for m in decode]
    if step.tpot_s is None or transfer_s is None or not router.places_by_tpot(
            sum(d.free_blocks for d in loads), sum(d.num_blocks for d in loads)):
        return None
    request = step.request
    transfer = transfer_s(len(request.token_ids))
    left = request.params.max_tokens - len(request.output_token_ids)
    return lambda m: meets_tpot(transfer, m.info.load.decode_step_s, left, step.tpot_s)
