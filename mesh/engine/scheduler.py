"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step has a token budget. Running sequences go first (one token each while
decoding, a chunk while prefilling), then waiting ones are admitted in arrival
order while their whole context fits in free KV blocks. When a decode needs a
block and none is free, the newest running sequence is preempted: its blocks
are freed and it is recomputed later from its prompt and the tokens it already
produced.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mesh.engine.block_manager import BlockManager
from mesh.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """What one step runs: decodes first (one token each), then prefill chunks."""
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    # Ended by the scheduler itself: each held the whole KV cache and needed one more block.
    out_of_cache: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills or self.out_of_cache)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
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
        with self.blocks.lock:  # free-block checks and allocations must not interleave with leases
            return self._schedule()

    def _schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 1 and not self._make_room(seq, batch):
                continue  # seq itself was preempted or ended; running[i] is now the next one
            (batch.decodes.append(seq) if n == 1 else batch.prefills.append((seq, n)))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            need = self.blocks.blocks_for(seq.num_tokens)
            if not self.blocks.can_allocate(need):
                break
            expected = self.blocks.blocks_for(
                min(self.max_model_len, seq.num_prompt_tokens + seq.params.max_tokens))
            seq.block_ids = self.blocks.allocate(need, expected_total=expected)
            seq.status = Status.RUNNING
            self.running.append(self.waiting.popleft())
            n = min(seq.num_uncomputed_tokens, budget)
            (batch.decodes.append(seq) if n == 1 else batch.prefills.append((seq, n)))
            budget -= n
        return batch

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
