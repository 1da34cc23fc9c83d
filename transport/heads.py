"""Which KV heads go from which tensor-parallel rank to which, between two sides that split a
model's KV heads differently (prefill TP=a, decode TP=b).

Each side lists, per rank, the model-wide KV heads its pool holds: consecutive, and with more
ranks than heads one head per rank, replicated. A receiving rank's heads are cut wherever a
possible sender's ranks change: each piece (a Part, one lease) then lies within one rank of
every sender, which writes it in one transfer. Where the receiver replicates a head, each
replica is a part of its own; where the sender replicates one, the ranks holding it take
the parts of those heads in turn (equal splits: rank r to rank r, the sends spread out).
Pure arithmetic on ranges: the ranks' heads come from the engine's sharding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """One lease of a sharded reservation: heads [start, stop) of receiving rank `rank`."""

    rank: int
    heads: tuple[int, int]


def parts(receiving: Sequence[range], senders: Sequence[Sequence[range]]) -> list[Part]:
    """The parts every receiving rank's heads are cut into, so that each lies within one rank of
    each sender in `senders` (each a list of its ranks' heads)."""
    cuts = {h for sender in senders for heads in sender for h in (heads.start, heads.stop)}
    out = []
    for rank, heads in enumerate(receiving):
        edges = sorted({heads.start, heads.stop} | {c for c in cuts if heads.start < c < heads.stop})
        out += [Part(rank, (a, b)) for a, b in zip(edges, edges[1:])]
    return out


def sending_ranks(sending: Sequence[range], wanted: Sequence[tuple[int, int]]) -> list[int]:
    """For each part's heads, in order, the sending rank that writes it: one holding all of them,
    in turn among those that do. ValueError when none does (the parts were cut for senders of
    another split)."""
    turns: dict[tuple[int, int], int] = {}
    out = []
    for heads in wanted:
        holders = [rank for rank, held in enumerate(sending) if held.start <= heads[0] and heads[1] <= held.stop]
        if not holders:
            raise ValueError(f"no rank of this side holds KV heads {heads[0]}..{heads[1] - 1} together "
                             f"(its ranks hold {[f'{r.start}..{r.stop - 1}' for r in sending]}): the lease "
                             "was cut for senders of other tensor-parallel sizes")
        turn = turns.get(heads, 0)
        turns[heads] = turn + 1
        out.append(holders[turn % len(holders)])
    return out
