"""Runs one scheduled step: packs the batch into tensors, runs the model, samples.

A step that raises is run again in halves, down to the sequences it fails with
alone; only those fail. Running a step again is safe: it writes the same KV into
the same slots (no sequence's computed count moves before the engine commits the
step), copy-on-write copies are redone only into the re-run sequences' blocks, and
a seeded draw depends on the seed and the position only.

With tensor parallelism this runner is rank 0's: it prepares each step's inputs,
hands the same inputs to the worker ranks (which run `run_model` on their shards),
runs its own shard, and samples from the logits gathered from all ranks. A failed
collective (a rank died or timed out) is not a request's failure: it ends the engine.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from mesh.engine.attention import AttentionMetadata, PrefillChunk, causal_mask
from mesh.engine.errors import SequenceError
from mesh.engine.faults import StepFaults
from mesh.engine.kv_cache import KVCache
from mesh.engine import paged_decode, prefill_attention
from mesh.engine.model import CausalLM
from mesh.engine.parallel import TensorParallelError
from mesh.engine.sampler import sample
from mesh.engine.scheduler import ScheduledBatch
from mesh.engine.sequence import Sequence

if TYPE_CHECKING:
    from mesh.engine.ranks import LocalRanks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInputs:
    """One step's model inputs, the same on every rank."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_at: list[int]  # rows of the step whose logits are sampled
    copies: list[tuple[int, int]]  # copy-on-write block copies to do first

    def encode(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self, buf)
        return buf.getvalue()

    @staticmethod
    def decode(data: bytes, device: torch.device) -> "StepInputs":
        """The inputs, their tensors on this rank's device."""
        return torch.load(io.BytesIO(data), map_location=device, weights_only=False)


def run_model(model: CausalLM, kv: KVCache, inputs: StepInputs,
              on_layer: Callable[[int], None] | None = None) -> torch.Tensor | None:
    """Runs the model (or one rank's shard) on a step's inputs; the sampled rows' logits, if any."""
    if inputs.copies:
        kv.copy_blocks(inputs.copies)
    hidden = model(inputs.input_ids, inputs.positions, inputs.meta, kv, on_layer)
    return model.logits(hidden[inputs.sample_at]) if inputs.sample_at else None


@dataclass
class StepOutput:
    """Tokens sampled this step, for the sequences that reached their end of context, and
    the sequences that failed in it (they have no token)."""
    seqs: list[Sequence]
    tokens: list[int]
    logprobs: list[float | None] | None
    failed: list[tuple[Sequence, SequenceError]] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, eos_ids: tuple[int, ...], faults: StepFaults | None = None,
                 ranks: LocalRanks | None = None):
        """ranks: the other tensor-parallel ranks, run in step with this one (None: one rank)."""
        self.model = model
        self.ranks = ranks
        self.kv = kv
        self.block_size = kv.shape.block_size
        self.window = model.cfg.sliding_window
        self.device = kv.pool.device
        self.eos_ids = eos_ids
        self.faults = faults
        self.decode_kernel = self.device.type == "cpu" and paged_decode.available()
        layer = model.layers[0]
        self.prefill_kernel = prefill_attention.usable(self.device, kv.pool.dtype, layer.head_dim, layer.num_heads,
                                                       layer.num_kv_heads)
        # On an accelerator a layer's kernels run after the host moved on. A worker rank writes
        # its KV on its own stream before its part of the layer's all-reduce, so once this
        # rank's stream has finished the layer, every rank's KV of it is in place: a layer hook
        # (a transfer reading worker pools through IPC) waits for that first. torch.cuda or torch.npu.
        self._layer_sync = None if ranks is None or self.device.type == "cpu" else getattr(torch, self.device.type)

    def execute(self, batch: ScheduledBatch,
                layer_hook: Callable[[int, ScheduledBatch], None] | None = None) -> StepOutput:
        """layer_hook(i, batch) runs once layer i's KV is in the cache; a re-run reports its
        layers again, for the part of the batch it runs."""
        try:
            return self._execute(batch, layer_hook)
        except TensorParallelError as e:
            raise self.ranks.failure(e) from None  # a rank is gone: no request can run any more
        except Exception as e:
            seqs = batch.sequences
            if len(seqs) == 1:
                log.warning("step of request %s failed: %r", seqs[0].request_id, e)
                return StepOutput([], [], None, [(seqs[0], SequenceError(f"its step failed: {e!r}"))])
            log.warning("a step of %d requests failed (%r): running it again in halves", len(seqs), e)
            return _merged([self.execute(part, layer_hook) for part in batch.halves()])

    @torch.inference_mode()
    def _execute(self, batch: ScheduledBatch, layer_hook: Callable[[int, ScheduledBatch], None] | None
                 ) -> StepOutput:
        inputs, sample_seqs = self._prepare(batch)
        if self.ranks is not None:
            self.ranks.send(inputs)
        failed: list[Exception] = []

        def on_layer(i: int) -> None:
            if failed:
                return
            try:
                if i == 0 and self.faults is not None:
                    self.faults.check(batch.sequences)  # part-way: layer 0's KV is written already
                if layer_hook is not None:
                    if self._layer_sync is not None:
                        self._layer_sync.current_stream(self.device).synchronize()
                    layer_hook(i, batch)
            except Exception as e:
                if self.ranks is None:
                    raise
                failed.append(e)  # the other ranks wait in this step's collectives: finish it with them

        logits = run_model(self.model, self.kv, inputs, on_layer)
        if failed:
            raise failed[0]
        if not sample_seqs:
            return StepOutput([], [], None)
        out = sample(logits, sample_seqs, self.eos_ids)
        ok = [i for i in range(len(sample_seqs)) if i not in out.failed]
        return StepOutput([sample_seqs[i] for i in ok], [out.tokens[i] for i in ok],
                          None if out.logprobs is None else [out.logprobs[i] for i in ok],
                          [(sample_seqs[i], SequenceError(f"no token to sample: {why}"))
                           for i, why in out.failed.items()],
                          None if out.top_logprobs is None else [out.top_logprobs[i] for i in ok])

    def _prepare(self, batch: ScheduledBatch) -> tuple[StepInputs, list[Sequence]]:
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        pos_parts: list[torch.Tensor] = []
        slot_parts: list[torch.Tensor] = []
        sample_at: list[int] = []
        sample_seqs: list[Sequence] = []
        meta = AttentionMetadata(slot_mapping=torch.empty(0), prefill_kernel=self.prefill_kernel, window=self.window)

        if batch.decodes:
            seqs = batch.decodes
            ctx = torch.tensor([s.num_computed_tokens + 1 for s in seqs], device=dev)
            width = max(len(s.block_ids) for s in seqs)
            table = torch.tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs], device=dev)
            pos = ctx - 1
            meta.num_decodes = len(seqs)
            if self.decode_kernel:
                meta.decode_table, meta.decode_hi, meta.block_size = table, ctx, bs
                meta.decode_lo = (torch.zeros_like(ctx) if self.window is None
                                  else (ctx - self.window).clamp(min=0))
            else:
                span = torch.arange(int(ctx.max()), device=dev)
                dslots = table[:, span // bs] * bs + span % bs  # [B, L]
                mask = span[None, :] < ctx[:, None]
                if self.window is not None:
                    mask &= span[None, :] >= ctx[:, None] - self.window
                meta.decode_slots, meta.decode_mask = dslots.view(-1), mask[:, None, None, :]
            pos_parts.append(pos)
            slot_parts.append(table.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs)
            for i, s in enumerate(seqs):
                ids.append(s.tokens_between(s.num_computed_tokens, s.num_computed_tokens + 1)[0])
                if s.num_computed_tokens + 1 == s.num_tokens:
                    sample_at.append(i)
                    sample_seqs.append(s)

        for seq, n in batch.prefills:
            start, q_start = seq.num_computed_tokens, len(ids)
            end = start + n
            ids.extend(seq.tokens_between(start, end))
            blocks = seq.block_ids[:-(-end // bs)]
            if blocks == list(range(blocks[0], blocks[0] + len(blocks))):  # one run: the context is a slice
                base = blocks[0] * bs
                ctx_slots: torch.Tensor | slice = slice(base, base + end)
                slot_parts.append(torch.arange(base + start, base + end, device=dev))
            else:
                span = torch.arange(end, device=dev)
                ctx_slots = torch.tensor(blocks, device=dev)[span // bs] * bs + span % bs
                slot_parts.append(ctx_slots[start:])
            pos_parts.append(torch.arange(start, end, device=dev))
            mask = None if self.prefill_kernel else causal_mask(n, end, self.window, dev)
            meta.prefills.append(PrefillChunk(q_start, n, end, ctx_slots, mask))
            if end == seq.num_tokens:
                sample_at.append(len(ids) - 1)
                sample_seqs.append(seq)

        meta.slot_mapping = torch.cat(slot_parts)
        inputs = StepInputs(torch.tensor(ids, device=dev), torch.cat(pos_parts), meta, sample_at, batch.copies)
        return inputs, sample_seqs


def _merged(parts: list[StepOutput]) -> StepOutput:
    """One step's output from the outputs of its parts."""
    def joined(name: str) -> list | None:
        values = [getattr(p, name) for p in parts]
        if all(v is None for v in values):
            return None
        return [x for p, v in zip(parts, values) for x in (v if v is not None else [None] * len(p.seqs))]

    return StepOutput([s for p in parts for s in p.seqs], [t for p in parts for t in p.tokens], joined("logprobs"),
                      [f for p in parts for f in p.failed], joined("top_logprobs"))
