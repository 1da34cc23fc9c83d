"""A simulated pool: the modelled counterpart of `mesh.pool.Pool`, judged by the same role rule
(`roles()` is the `mesh.role_limits.PoolRoles` a live pool's `roles()` returns), and its indexes, kept up to date as actors change, so that placing one request
costs O(log n) rather than a sort of the pool:

- the serving prefill actors by queue (requests, then tokens, then when they joined the
  pool), as a heap with stale entries dropped when they surface: the few that can come
  first in the router's idle-first order, which `mesh.routing.ForwardOnRejection.prefill_order`
  then orders for each offer as it does live;
- the decode actors by free KV tokens, most first (`mesh.routing.ForwardOnRejection.decode_order`),
  as a heap with stale entries dropped when they surface;
- for the central-scheduler baseline, the prefill actors by their last queue report plus
  what the scheduler placed on them since.
"""
from __future__ import annotations

import heapq
from collections import Counter, deque

from mesh.role_limits import PoolRoles
from scenarios.spec import ScenarioSpec
from simtests.actors import Actor


class SimPool:
    __slots__ = ("index", "name", "members", "prefill", "queue_heap", "decode", "free_heap", "waiting", "admitting",
                 "estimates", "holders")

    def __init__(self, index: int, name: str):
        self.index, self.name = index, name
        self.members: set[int] = set()  # every actor in the pool or draining towards it
        self.prefill: list[int] = []  # serving prefill (or both), not draining
        self.queue_heap: list[tuple[int, int, int, int]] = []  # (queued requests, tokens, joined, actor)
        self.decode: list[int] = []  # serving decode, not draining
        self.free_heap: list[tuple[int, int, int]] = []  # (-free KV tokens, kv_version, actor)
        self.waiting: deque[int] = deque()  # requests waiting for a decode reservation, in order
        self.admitting = False  # the simulator is admitting waiting requests (no re-entry)
        self.estimates: list[tuple[int, int]] = []  # central: (estimated queued tokens, actor)
        self.holders: dict[int, set[int]] = {}  # prefix block id -> prefill actors whose cache holds it

    def roles(self, actors: list[Actor], spec: ScenarioSpec) -> PoolRoles:
        """What the role rule looks at, as a live pool shows it: the actors serving each role
        here (a draining one serves none), the scenario's limits and each role's device."""
        serving = Counter(actors[aid].role for aid in self.members
                          if not actors[aid].draining and actors[aid].pool == self.index)
        return PoolRoles(self.name, serving, spec.limits, {role: hw.device for role, hw in spec.hardware.items()})

    def longest_prefix_holders(self, ids: list[int]) -> tuple[int, list[int]]:
        """How many leading blocks of `ids` some actors hold, and those actors in id order
        (block ids chain: holding block i means holding all before it)."""
        for i in range(len(ids) - 1, -1, -1):
            held = self.holders.get(ids[i])
            if held:
                return i + 1, sorted(held)
        return 0, []

    # -- prefix caches -------------------------------------------------------------------
    def cache(self, a: Actor, ids: list[int], block_tokens: int) -> int:
        """How many leading blocks of `ids` a's prefix cache holds; then it holds them all as
        its most recent, the least recent evicted past the cache's room (its KV pool, in blocks)."""
        cache, holders = a.cache, self.holders
        hits = 0
        for h in ids:
            if h not in cache:
                break
            hits += 1
        for h in ids:
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
                holders.setdefault(h, set()).add(a.id)
        room = a.capacity // block_tokens
        while len(cache) > room:
            self._forget(a, cache.popitem(last=False)[0])
        return hits

    def forget(self, a: Actor) -> None:
        """a leaves the pool or its role: its cache is emptied and no longer indexed here."""
        for h in a.cache:
            self._forget(a, h)
        a.cache.clear()

    def _forget(self, a: Actor, h: int) -> None:
        held = self.holders[h]
        held.discard(a.id)
        if not held:
            del self.holders[h]

    # -- prefill by queue -----------------------------------------------------------------
    def note_queue(self, a: Actor, actors: list[Actor]) -> None:
        """After a's prefill queue changed (or it joined the pool): index it again."""
        heapq.heappush(self.queue_heap, (a.queued_requests, a.queued_tokens, a.joined, a.id))
        if len(self.queue_heap) > 4 * len(self.prefill) + 64:  # mostly stale entries: rebuild
            self.queue_heap = [e for e in self.queue_heap if _current(e, actors[e[3]])]
            heapq.heapify(self.queue_heap)

    def least_queued(self, actors: list[Actor], k: int) -> list[Actor]:
        """The k serving prefill actors with the least queue: any others come after them in
        the router's idle-first order."""
        heap, found, seen = self.queue_heap, [], set()
        while heap and len(found) < k:
            e = heapq.heappop(heap)
            if e[3] not in seen and _current(e, actors[e[3]]):
                seen.add(e[3])
                found.append(e)
        for e in found:
            heapq.heappush(heap, e)
        return [actors[e[3]] for e in found]

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



def _current(entry: tuple[int, int, int, int], a: Actor) -> bool:
    """Whether a queue entry still describes its actor: not draining, in the same stay in a
    pool (`joined` is new on every entry), with the same queue."""
    return not a.draining and a.joined == entry[2] and (a.queued_requests, a.queued_tokens) == entry[:2]
