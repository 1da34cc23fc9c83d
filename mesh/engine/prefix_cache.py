"""Prefix caching: full KV blocks found again by a hash of every token up to their end.

A block's hash chains its parent's hash with its own tokens, so equal hashes mean
equal contexts, and the hashes are the same in every process (the gateway's
prefix index computes them from prompts). A cached block is shared by reference
count; once no request holds it, it stays in the cache, least recently used
first out, until its memory is needed. Only full blocks are cached, so a shared
block is never written, except when a whole prompt hits: then its last block is
copied before the last token is recomputed into it (copy-on-write).

PrefixCache has BlockManager's interface, so the scheduler and lease tables take
blocks from either the same way.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Iterable

from mesh.engine.block_manager import BlockManager, OutOfBlocks

ROOT_HASH = 0


def chain_hash(parent: int, tokens: Iterable[int]) -> int:
    """64-bit hash of a block of tokens after the context `parent` hashes."""
    h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little")


def block_hashes(tokens: list[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Hashes of every full block of tokens, which follow the context `parent` hashes."""
    out = []
    for i in range(len(tokens) // block_size):
        parent = chain_hash(parent, tokens[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class PrefixCache:
    """Reference-counted, hash-addressed blocks over a BlockManager's free runs.

    Blocks that no request holds but that keep cached KV stay allocated in the
    BlockManager and are counted in num_free: they are evicted, oldest first, only
    when an allocation would otherwise fail.
    """

    def __init__(self, blocks: BlockManager):
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.num_blocks = blocks.num_blocks
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._refs: dict[int, int] = {}  # cached blocks only; others have exactly one owner
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, least recent first
        self.hits = self.queries = self.evictions = 0  # blocks, for stats

    def blocks_for(self, num_tokens: int) -> int:
        return self.blocks.blocks_for(num_tokens)

    @property
    def num_free(self) -> int:
        return self.blocks.num_free + len(self._idle)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def match(self, hashes: list[int]) -> list[int]:
        """The cached blocks holding the longest prefix of these block hashes; not yet held."""
        found = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            found.append(b)
        self.queries += len(hashes)
        self.hits += len(found)
        return found

    def acquire(self, block_ids: list[int]) -> None:
        """Takes a reference on cached blocks (from match)."""
        for b in block_ids:
            self._refs[b] += 1
            self._idle.pop(b, None)

    def allocate(self, n: int, expected_total: int | None = None) -> list[int]:
        self._evict(n)
        return self.blocks.allocate(n, expected_total)

    def append(self, block_ids: list[int]) -> int:
        self._evict(1)
        return self.blocks.append(block_ids)

    def free(self, block_ids: list[int]) -> None:
        """Drops one reference on each block: cached ones stay as idle cache, others go free."""
        plain = []
        for b in block_ids:
            refs = self._refs.get(b)
            if refs is None:
                plain.append(b)
            elif refs == 0:
                raise ValueError(f"block {b} freed but not held")
            else:
                self._refs[b] = refs - 1
                if refs == 1:
                    self._idle[b] = None
        self.blocks.free(plain)

    def register(self, block_id: int, block_hash: int) -> None:
        """Makes a held, full block findable by its hash (a no-op when the hash or the block is
        already cached: the first copy of a context stays the cached one)."""
        if block_hash in self._by_hash or block_id in self._hash_of:
            return
        self._by_hash[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        self._refs[block_id] = 1

    def clear(self) -> int:
        """Evicts every cached block no request holds; returns how many."""
        n = len(self._idle)
        self._evict(self.blocks.num_free + n)
        return n

    def runs(self) -> list[tuple[int, int]]:
        return self.blocks.runs()

    def _evict(self, n: int) -> None:
        short = n - self.blocks.num_free
        if short > len(self._idle):
            raise OutOfBlocks(f"{n} blocks asked for, {self.num_free} free")
        victims = []
        for _ in range(max(short, 0)):
            b, _ = self._idle.popitem(last=False)
            del self._by_hash[self._hash_of.pop(b)], self._refs[b]
            victims.append(b)
        if victims:
            self.evictions += len(victims)
            self.blocks.free(victims)
