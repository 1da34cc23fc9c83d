"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step has a token budget. Running sequences go first (one token each while
decoding, a chunk while prefilling), then waiting ones are admitted in arrival
order while their whole context fits in free KV blocks. While any sequence
decodes, a step's prefill chunks take at most `prefill_chunk_tokens` together:
a long prompt is prefilled over several steps, each with the running decodes,
so that their tokens keep coming (chunked prefill mixed with decode). When a decode needs a
block and none is free, the newest running sequence is preempted: its blocks
are freed and it is recomputed later from its prompt and the tokens it already
produced.

With a prefix cache, a newly admitted sequence starts after the longest run of
its full prompt blocks already in the cache, and every block that fills up is
added to the cache when the step that computed it is committed.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mesh.engine.block_manager import BlockManager
from mesh.engine.prefix_cache import ROOT_HASH, PrefixCache, block_hashes
from mesh.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """What one step runs: decodes first (one token each), then prefill chunks."""
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    # Ended by the scheduler itself: each held the whole KV cache and needed one more block.
    out_of_cache: list[Sequence] = field(default_factory=list)
    # (source, destination) blocks to copy before the step runs: copy-on-write of a shared block.
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills or self.out_of_cache)

    @property
    def sequences(self) -> list[Sequence]:
        return self.decodes + [s for s, _ in self.prefills]

    def halves(self) -> tuple[ScheduledBatch, ScheduledBatch]:
        """The sequences in two batches of about half (to find the one a failing step fails
        on). Each keeps the copies into its own sequences' blocks: copying a block again
        rewrites no KV of the other half."""
        mid = (len(self.decodes) + len(self.prefills)) // 2
        cut = max(0, mid - len(self.decodes))
        parts = ScheduledBatch(self.decodes[:mid], self.prefills[:cut]), \
            ScheduledBatch(self.decodes[mid:], self.prefills[cut:])
        for part in parts:
            blocks = {b for seq in part.sequences for b in seq.block_ids}
            part.copies = [(src, dst) for src, dst in self.copies if dst in blocks]
        return parts

    def without(self, gone: list[Sequence]) -> ScheduledBatch:
        """The batch less the sequences that failed in it, with all its copies (their sources
        are let go of in commit whoever the destination was)."""
        ids = {id(seq) for seq in gone}  # sequences compare by value, prompts and all: go by identity
        return ScheduledBatch([s for s in self.decodes if id(s) not in ids],
                              [(s, n) for s, n in self.prefills if id(s) not in ids], copies=self.copies)


class Scheduler:
    def __init__(self, blocks: BlockManager | PrefixCache, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, prefill_chunk_tokens: int | None = None):
        self.blocks = blocks
        self.cache = blocks if isinstance(blocks, PrefixCache) else None
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens or max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose blocks and KV are already in place (KV received from a prefill)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        decoding = any(seq.num_uncomputed_tokens == 1 for seq in self.running)
        prefill_left = self.prefill_chunk_tokens if decoding else budget
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if n > 1:
                n = min(n, prefill_left)
                if not n:  # this step's prefill share is spent: the decodes after it still run
                    i += 1
                    continue
                prefill_left -= n
            if n == 1 and not self._make_room(seq, batch):
                continue  # seq itself was preempted or ended; running[i] is now the next one
            (batch.decodes.append(seq) if n == 1 else batch.prefills.append((seq, n)))
            budget -= n
            i += 1
        while self.waiting and min(budget, prefill_left) > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._allocate(seq, batch):
                break
            seq.status = Status.RUNNING
            self.running.append(self.waiting.popleft())
            n = min(seq.num_uncomputed_tokens, budget, prefill_left)
            (batch.decodes.append(seq) if n == 1 else batch.prefills.append((seq, n)))
            budget -= n
            prefill_left -= n if n > 1 else 0
        return batch

    def _allocate(self, seq: Sequence, batch: ScheduledBatch) -> bool:
        """Gives a waiting sequence blocks for its whole context, reusing cached prefix blocks;
        False (holding nothing) when they do not fit."""
        hits: list[int] = []
        if self.cache is not None:
            if len(seq.block_hashes) != seq.num_tokens // self.blocks.block_size:
                seq.block_hashes = block_hashes(seq.token_ids, self.blocks.block_size)
            hits = self.cache.match(seq.block_hashes)
            self.cache.acquire(hits)
        bs = self.blocks.block_size
        # A prompt that hits whole still computes its last token, into a copy of its last block.
        cow = hits[-1] if hits and len(hits) * bs == seq.num_tokens else None
        shared = hits[:-1] if cow is not None else hits
        need = self.blocks.blocks_for(seq.num_tokens) - len(shared)
        if not self.blocks.can_allocate(need):
            self.blocks.free(hits)
            return False
        expected = self.blocks.blocks_for(min(self.max_model_len, seq.num_prompt_tokens + seq.params.max_tokens))
        seq.block_ids = shared + self.blocks.allocate(need, expected_total=expected - len(shared))
        seq.num_cached_blocks = len(shared)  # a copy-on-write block is cached again once computed
        seq.num_computed_tokens = len(hits) * bs
        if cow is not None:
            batch.copies.append((cow, seq.block_ids[len(shared)]))  # cow is freed in commit()
            seq.num_computed_tokens -= 1
        return True

    def commit(self, batch: ScheduledBatch) -> None:
        """After a step ran: counts its tokens as computed, caches the blocks it filled and
        lets go of copy-on-write sources."""
        for seq, n in [(s, 1) for s in batch.decodes] + batch.prefills:
            seq.num_computed_tokens += n
            if self.cache is not None:
                self._cache_full_blocks(seq)
        if batch.copies:
            self.blocks.free([src for src, _ in batch.copies])

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Registers the blocks whose KV is now complete, hashing the tokens they hold."""
        bs, known = self.blocks.block_size, len(seq.block_hashes)
        full = seq.num_computed_tokens // bs
        if full <= seq.num_cached_blocks:
            return
        if full > known:
            parent = seq.block_hashes[-1] if known else ROOT_HASH
            seq.block_hashes += block_hashes(seq.tokens_between(known * bs, full * bs), bs, parent)
        for i in range(seq.num_cached_blocks, full):
            self.cache.register(seq.block_ids[i], seq.block_hashes[i])
        seq.num_cached_blocks = full

    def _make_room(self, seq: Sequence, batch: ScheduledBatch) -> bool:
        """Ensures a block for seq's next token, preempting the newest sequences; False if seq went."""
        while seq.num_computed_tokens >= len(seq.block_ids) * self.blocks.block_size:
            if self.blocks.num_free:
                self.blocks.append(seq.block_ids)
                return True
            if len(seq.block_ids) >= self.blocks.num_blocks:
                # Recomputing it later could never fit either: end it at the cache's length.
                self.finish(seq, "length")
                batch.out_of_cache.append(seq)
                return False
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_ids)
        seq.block_ids = []
        seq.num_cached_blocks = 0
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, keep_blocks: bool = False) -> None:
        """Ends a sequence (stop, length, abort, prefilled) and frees its blocks at once,
        unless keep_blocks: then the caller owns them (a prefill handing its KV on)."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            if not keep_blocks:
                self.blocks.free(seq.block_ids)
                seq.block_ids = []
        else:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
