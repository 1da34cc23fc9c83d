"""A simulated pool's indexes, kept up to date as actors change, so that reserving decode KV
costs O(log n) rather than a sort of the pool:

- the prefill actors serving, in the order they joined (`mesh.routing.ForwardOnRejection.prefill_order`
  orders them for each offer, as live dispatch does);
- the decode actors by free KV tokens, most first (`mesh.routing.ForwardOnRejection.decode_order`),
  as a heap with stale entries dropped when they surface;
- for the central-scheduler baseline, the prefill actors by their last queue report plus
  what the scheduler placed on them since.
"""
from __future__ import annotations

import heapq
from collections import deque

from simtests.actors import Actor


class Pool:
    __slots__ = ("index", "name", "members", "prefill", "decode", "free_heap", "waiting", "admitting", "estimates",
                 "holders")

    def __init__(self, index: int, name: str):
        self.index, self.name = index, name
        self.members: set[int] = set()  # every actor in the pool or draining towards it
        self.prefill: list[int] = []  # serving prefill (or both), not draining
        self.decode: list[int] = []  # serving decode, not draining
        self.free_heap: list[tuple[int, int, int]] = []  # (-free KV tokens, kv_version, actor)
        self.waiting: deque[int] = deque()  # requests waiting for a decode reservation, in order
        self.admitting = False  # the simulator is admitting waiting requests (no re-entry)
        self.estimates: list[tuple[int, int]] = []  # central: (estimated queued tokens, actor)
        self.holders: dict[int, set[int]] = {}  # prefix block id -> prefill actors whose cache holds it

    def longest_prefix_holders(self, ids: list[int]) -> tuple[int, list[int]]:
        """How many leading blocks of `ids` some actors hold, and those actors in id order
        (block ids chain: holding block i means holding all before it)."""
        for i in range(len(ids) - 1, -1, -1):
            held = self.holders.get(ids[i])
            if held:
                return i + 1, sorted(held)
        return 0, []

    # -- decode by free KV -----------------------------------------------------------------
    def note_kv(self, a: Actor, actors: list[Actor]) -> None:
        """After a's free KV changed (or it joined the pool): index it again."""
        a.kv_version += 1
        heapq.heappush(self.free_heap, (-a.free, a.kv_version, a.id))
        if len(self.free_heap) > 4 * len(self.decode) + 64:  # mostly stale entries: rebuild
            self.free_heap = [e for e in self.free_heap if actors[e[2]].kv_version == e[1]]
            heapq.heapify(self.free_heap)

    def most_free(self, actors: list[Actor]) -> Actor | None:
        heap = self.free_heap
        while heap:
            free, version, aid = heap[0]
            a = actors[aid]
            if a.kv_version == version and not a.draining and a.pool == self.index:
                return a
            heapq.heappop(heap)
        return None

    # -- the central scheduler's view ------------------------------------------------------
    def report(self, actors: list[Actor]) -> None:
        """Every actor's queue as of now; the scheduler uses it until the next report."""
        self.estimates = [(actors[aid].queued_tokens, aid) for aid in self.prefill]
        heapq.heapify(self.estimates)

    def least_reported(self, actors: list[Actor], tokens: int) -> Actor | None:
        """The actor with the least estimated queue; counts `tokens` against it."""
        est = self.estimates
        while est:
            queued, aid = est[0]
            a = actors[aid]
            if a.draining or a.pool != self.index:  # moved since the report: the scheduler learns it now
                heapq.heappop(est)
                continue
            heapq.heapreplace(est, (queued + tokens, aid))
            return a
        return None

