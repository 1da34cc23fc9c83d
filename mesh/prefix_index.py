"""Which prefill actor likely holds a prompt's prefix: a compact, approximate index.

Prompts are hashed in chunks of `chunk_tokens` (a multiple of the engine's block size),
each hash chained over every token before it (mesh.engine.prefix_cache.block_hashes), so
one hash names a whole prefix. That is coarser than the engine's blocks: fewer hashes to
compute per request and to report per actor, and a hit still means whole engine blocks.

Actor side, `PrefixRecord`: the chunk hashes of the prompts the actor prefilled, least
recently used first out, no more than its KV cache could hold (the engine evicts its idle
cached blocks least recently used first, so older ones are likely gone) and no more than
`max_entries`; reported in the actor's load report with a version that changes with them.

Dispatcher side, `PrefixIndex`: a set of hashes per actor, replaced from each newer
report, and added to when the dispatcher has an actor prefill a prompt (the actor holds it
from then on; its next report says so too). Both are plain objects: the simulator can use
them with its modelled actors.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

from mesh.api import DEFAULT_CHUNK_TOKENS, PrefixReport
from mesh.engine.prefix_cache import block_hashes

DEFAULT_MAX_ENTRIES = 1024  # hashes per actor: 8 KiB a report, 64k tokens of distinct prefixes at 64


def chunk_tokens_for(block_size: int, wanted: int = DEFAULT_CHUNK_TOKENS) -> int:
    """The chunk size nearest above `wanted` that is whole blocks of the engine."""
    return max(1, -(-wanted // block_size)) * block_size


class PrefixRecord:
    def __init__(self, chunk_tokens: int, capacity_tokens: int, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.chunk_tokens = chunk_tokens
        self.capacity = max(0, min(max_entries, capacity_tokens // chunk_tokens))
        self.version = 0
        self._lru: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def touch(self, token_ids: list[int]) -> None:
        """The actor prefilled this prompt: its prefix chunks are the most recently used."""
        if not self.capacity:
            return  # the engine caches no prefix
        hashes = block_hashes(token_ids, self.chunk_tokens)
        if not hashes:
            return
        for h in hashes:
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
        self.version += 1

    def report(self) -> PrefixReport:
        return PrefixReport(self.chunk_tokens, self.version, tuple(self._lru))


class PrefixIndex:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.max_entries = max_entries  # per actor, for what the dispatcher adds between reports
        self._sets: dict[str, set[int]] = {}
        self._chunk: dict[str, int] = {}
        self._version: dict[str, int] = {}

    def sync(self, reports: Mapping[str, PrefixReport | None]) -> None:
        """The actors' latest reports (actor id -> report, None when it sent none); actors not
        named are forgotten. A report replaces what is known only when its version is new."""
        for gone in self._sets.keys() - reports.keys():
            self._forget(gone)
        for actor_id, report in reports.items():
            if not report:
                self._forget(actor_id)
            elif self._version.get(actor_id) != report.version or actor_id not in self._sets:
                self._sets[actor_id] = set(report.hashes)
                self._chunk[actor_id] = report.chunk_tokens
                self._version[actor_id] = report.version

    def placed(self, actor_id: str, token_ids: list[int]) -> None:
        """The actor prefilled this prompt: it holds its chunks until its next report says more."""
        chunk = self._chunk.get(actor_id)
        if chunk is None:
            return  # no report yet: its chunk size is unknown
        known = self._sets[actor_id]
        for h in block_hashes(token_ids, chunk):
            if len(known) >= self.max_entries:
                break
            known.add(h)

    def expected_tokens(self, token_ids: list[int], actor_ids: Iterable[str]) -> dict[str, int]:
        """Per actor, the prompt tokens it likely holds: the longest run of leading chunks it
        reported. Each chunk size is hashed once per prompt."""
        hashes_by_chunk: dict[int, list[int]] = {}
        out = {}
        for actor_id in actor_ids:
            chunk = self._chunk.get(actor_id)
            if chunk is None:
                out[actor_id] = 0
                continue
            if chunk not in hashes_by_chunk:
                hashes_by_chunk[chunk] = block_hashes(token_ids, chunk)
            known, n = self._sets[actor_id], 0
            for h in hashes_by_chunk[chunk]:
                if h not in known:
                    break
                n += 1
            out[actor_id] = n * chunk
        return out

    def _forget(self, actor_id: str) -> None:
        self._sets.pop(actor_id, None)
        self._chunk.pop(actor_id, None)
        self._version.pop(actor_id, None)
