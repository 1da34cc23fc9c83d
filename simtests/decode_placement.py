"""Decode placement in the simulator: which decode actor reserves a request's KV, in the router's
order as live dispatch calls it (`mesh.routing.ForwardOnRejection.decode_order`: the most free
first, unless the request would miss its TPOT target there and meet it on another), and the
requests that found no decode KV free, admitted in arrival order as it frees.

A reservation holds the request's prompt and whole output on one actor (`Simulator.decode_of`)
until it finishes or is rejected. Where live dispatch predicts a request's TPOT from the actors'
last measured step (mesh.tpot_fit), this predicts it from the modelled actor's own steps for when
the request's KV arrives (`simtests.actors.Actor.step_s_at`).
"""
from __future__ import annotations

from operator import attrgetter
from typing import TYPE_CHECKING, Callable

from mesh.routing import meets_tpot
from simtests.actors import Actor
from simtests.pools import SimPool
from simtests.results import ACTIVE

if TYPE_CHECKING:
    from simtests.sim import Simulator


class DecodePlacement:
    """The simulator's decode KV reservations, on its state (its flat per-request lists)."""

    def __init__(self, sim: "Simulator"):
        self.sim = sim

    def reserve(self, pool: SimPool, rid: int) -> bool:
        """On the decode actor first in the router's order (`decode_order`, as live dispatch calls it)
        that has room: the most free, unless the request would miss its TPOT target there and meet
        it on another (`_tpot_fit`). The full order is only built in that case. Whether one had room."""
        sim = self.sim
        need = sim.prompt[rid] + sim.output[rid]
        a = pool.most_free(sim.actors)
        if a is None or a.free < need:
            return False
        meets = self._tpot_fit(pool, rid)
        if meets is not None and not meets(a):
            roomy = [sim.actors[d] for d in pool.decode if sim.actors[d].free >= need]
            a = sim.forwarding.decode_order(roomy, attrgetter("free"), meets)[0]
        a.reserved += need
        pool.note_kv(a, sim.actors)
        sim.decode_of[rid] = a.id
        return True

    def admit_waiting(self, pool: SimPool) -> None:
        """In order, while decode KV lasts; each one admitted goes on to find a prefill actor. A
        request rejected there frees its reservation, which calls this again: that call returns and
        this loop goes on (no recursion per request)."""
        if pool.admitting:
            return
        pool.admitting = True
        sim, waiting = self.sim, pool.waiting
        try:
            while waiting:
                rid = waiting[0]
                if sim.state[rid] != ACTIVE:  # expired while waiting
                    waiting.popleft()
                elif self.reserve(pool, rid):
                    waiting.popleft()
                    sim.find_prefill(pool, rid)
                else:
                    return
        finally:
            pool.admitting = False

    def _tpot_fit(self, pool: SimPool, rid: int) -> Callable[[Actor], bool] | None:
        """Whether rid would meet its TPOT target on a decode actor (mesh.routing.meets_tpot): its KV
        transfer, then its steps there as the actor predicts them for when its KV arrives (its prompt
        prefilled alone, then sent). None when it would miss it even on an empty actor, or when the
        pool's decode KV is short (`ForwardOnRejection.places_by_tpot`): then room alone orders them
        (or when it has no TPOT: one output token)."""
        sim = self.sim
        model, p, out, target = sim.cluster.models[sim.names[sim.scen[rid]]], sim.prompt[rid], \
            sim.output[rid], sim.tpot_target[sim.scen[rid]]
        transfer = model.prompt_transfer_s(p, sim.contiguous)
        if out <= 1 or not meets_tpot(transfer, model.decode_step_s(1, p), out, target):
            return None
        decode = [sim.actors[d] for d in pool.decode]
        if not sim.forwarding.places_by_tpot(sum(a.free for a in decode), sum(a.capacity for a in decode)):
            return None
        arrives_s = model.prefill_s(p, p * p) + transfer
        prompt, output, now = sim.prompt, sim.output, sim.now

        def meets(a: Actor) -> bool:
            # at most the step with all of a's reserved KV in the batch: when that meets it, no need to predict
            return (meets_tpot(transfer, model.decode_step_s(a.size + 1, a.reserved + p), out, target)
                    or meets_tpot(transfer, a.step_s_at(now, arrives_s, p, prompt, output), out, target))
        return meets
