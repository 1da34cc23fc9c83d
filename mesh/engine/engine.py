"""The engine loop: requests in, one scheduled step at a time, token and text deltas out."""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from mesh.engine.block_manager import BlockManager
from mesh.engine.config import EngineConfig
from mesh.engine.detokenizer import Detokenizer
from mesh.engine.device import resolve_device, resolve_dtype
from mesh.engine.errors import EngineError, RequestError, SequenceError
from mesh.engine.faults import StepFaults
from mesh.engine.kv_cache import Allocator, zeros
from mesh.engine.model_config import ModelConfig
from mesh.engine.model_runner import ModelRunner
from mesh.engine.prefix_cache import PrefixCache
from mesh.engine.rank import RankMemory, build_rank, context_length, prepare_process
from mesh.engine.ranks import LocalRanks
from mesh.engine.sampling_params import SamplingParams
from mesh.engine.scheduler import ScheduledBatch, Scheduler
from mesh.engine.sequence import Sequence, Status
from mesh.engine.shard import Shard
from mesh.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step added to one request."""
    request_id: str
    token_ids: list[int]  # new tokens
    text: str  # new text
    logprobs: list[float] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "prefilled" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: EngineError | None = None  # why the request failed, with finish reason "error"
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per new token: the most likely (id, logprob)


@dataclass
class Completion:
    """A whole request's result, as `generate` returns it."""
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = field(default=None)


class Engine:
    def __init__(self, config: EngineConfig, allocate_kv: Allocator = zeros):
        """allocate_kv: the KV pool's memory (kv_cache.KVCache)."""
        self.config = config
        self.model_config = ModelConfig.from_folder(config.model)
        self.tokenizer = Tokenizer(config.model)
        self.device = resolve_device(config.device)
        prepare_process(config, self.device)
        self.dtype = resolve_dtype(config.dtype, self.model_config.dtype, self.device)
        mc = self.model_config
        self.max_model_len = context_length(config, mc)
        # Tensor parallelism: the workers build their shards while this process builds rank 0's.
        tp = config.tensor_parallel_size
        self.ranks = LocalRanks(config, mc, self.device, self.dtype) if tp > 1 else None
        try:
            self.model, self.kv = build_rank(config, mc, self.device, self.dtype, Shard(0, tp),
                                             None if self.ranks is None else self.ranks.comm, allocate_kv)
            if self.ranks is not None:
                self.ranks.connect(RankMemory.of(self.model, self.kv))
        except BaseException:
            self.close()
            raise
        # Every rank's KV pool as this process maps it (rank 0's first), for a transport to move
        # each rank's heads; None where worker ranks' pools are not shared (ranks.unshared says why).
        self.rank_pools: list[torch.Tensor] | None = [self.kv.pool]
        if self.ranks is not None:
            self.rank_pools = None if self.ranks.pools is None else [self.kv.pool, *self.ranks.pools]
        num_blocks = self.kv.shape.num_blocks
        manager = BlockManager(num_blocks, config.block_size)
        self.blocks = PrefixCache(manager) if config.enable_prefix_caching else manager
        # Accelerators need bigger steps to fill (and their steps cost launches, not just work).
        step_tokens = config.max_num_batched_tokens or (2048 if self.device.type == "cpu" else 8192)
        chunk = config.prefill_chunk_tokens or (512 if self.device.type == "cpu" else 2048)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, step_tokens,
                                   self.max_model_len, min(chunk, step_tokens))
        self.eos_ids = tuple(sorted(set(mc.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())))
        self.runner = ModelRunner(self.model, self.kv, self.eos_ids,
                                  StepFaults(config.fail_steps) if config.fail_steps else None, self.ranks)
        self._requests: dict[str, tuple[Sequence, Detokenizer]] = {}
        self._held: dict[str, Sequence] = {}  # prefilled, KV kept until release()
        # Outputs waiting for the `stream`/`generate` caller of each request, so that several
        # of them can share the engine's steps without taking each other's outputs.
        self._inboxes: dict[str, deque[RequestOutput]] = {}
        # Called after each layer of each step with (layer, batch): layer-wise KV transfer.
        self.layer_hook: Callable[[int, ScheduledBatch], None] | None = None
        self.last_batch: ScheduledBatch | None = None  # what the last step ran, for load figures
        log.info("engine: %s on %s in %s, %d KV blocks of %d tokens", mc.architecture, self.device,
                 self.dtype, num_blocks, config.block_size)

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, prefill_only: bool = False, output_ids: list[int] = ()) -> str:
        """Queues a request. prefill_only: it ends after its next token with finish
        reason "prefilled" and keeps its KV blocks until `release` (disaggregated prefill).
        output_ids: tokens the request generated and sent on another actor (it moved after
        a failure or a drain); they are computed with the prompt, count towards max_tokens
        and min_tokens, their text is not sent again, and it goes on exactly as if it had
        never moved (stop strings across the move, seeded draws)."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(ids + list(output_ids), params)
        if len(output_ids) >= params.max_tokens:
            raise RequestError(f"the request has {len(output_ids)} tokens already, its max_tokens is "
                               f"{params.max_tokens}: nothing is left to generate")
        seq = self._register(Sequence(ids, params, request_id=request_id or "", prefill_only=prefill_only,
                                      output_token_ids=list(output_ids)))
        self.scheduler.add(seq)
        return seq.request_id

    def add_prefilled(self, prompt_ids: list[int], output_ids: list[int], params: SamplingParams,
                      block_ids: list[int], request_id: str | None = None) -> str:
        """Joins the decode batch with a request whose KV (all of prompt_ids and all but the
        last of output_ids) is already in block_ids, which this engine's block manager handed out."""
        if not output_ids:
            raise RequestError("a prefilled request carries at least its first generated token")
        self._check_prompt(prompt_ids, params)
        seq = Sequence(list(prompt_ids), params, request_id=request_id or "", block_ids=list(block_ids),
                       output_token_ids=list(output_ids))
        seq.num_computed_tokens = seq.num_tokens - 1
        if self.blocks.blocks_for(seq.num_computed_tokens) > len(block_ids):
            raise RequestError(f"{len(block_ids)} blocks cannot hold the KV of {seq.num_computed_tokens} tokens")
        self._register(seq)
        self.scheduler.add_running(seq)
        return seq.request_id

    def _register(self, seq: Sequence) -> Sequence:
        if seq.request_id in self._requests or seq.request_id in self._held:
            raise RequestError(f"request id {seq.request_id!r} is already in use")
        detok = Detokenizer(self.tokenizer, seq.params.stop)
        detok.resume(seq.output_token_ids)  # their text was sent by the actor that generated them
        self._requests[seq.request_id] = (seq, detok)
        return seq

    def held_blocks(self, request_id: str) -> list[int]:
        """Blocks of a finished prefill_only request, holding its prompt's KV."""
        return self._held[request_id].block_ids

    def release(self, request_id: str) -> None:
        """Frees a prefill_only request's blocks once its KV has been handed on."""
        seq = self._held.pop(request_id, None)
        if seq is not None:
            self.blocks.free(seq.block_ids)
            seq.block_ids = []

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise RequestError("the prompt is empty: send at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise RequestError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise RequestError(f"stop_token_ids must be in [0, {vocab}) for this model, got {bad[:5]}")
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        if params.min_tokens and len(banned) >= vocab:
            raise RequestError("stop_token_ids and EOS ban every token until min_tokens: nothing could be "
                               "generated; lower min_tokens or send fewer stop_token_ids")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens, the model's context is "
                               f"{self.max_model_len}: shorten the prompt")
        need = self.blocks.blocks_for(len(ids) + 1)
        if need > self.blocks.num_blocks:
            raise RequestError(f"the prompt needs {need} KV blocks, the cache has "
                               f"{self.blocks.num_blocks}: shorten the prompt or give more KV memory")

    def abort(self, request_id: str) -> None:
        self._inboxes.pop(request_id, None)
        entry = self._requests.pop(request_id, None)
        if entry is not None:
            self.scheduler.finish(entry[0], "abort")
        self.release(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def close(self) -> None:
        """Stops the tensor-parallel worker ranks, if any (they also stop when this process ends)."""
        if self.ranks is not None:
            self.ranks.close()

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self.last_batch = batch
        if not batch:
            return []
        outputs = [self._ended(seq) for seq in batch.out_of_cache]
        if not (batch.decodes or batch.prefills):
            return outputs
        out = self.runner.execute(batch, self.layer_hook)
        outputs += [self._fail(seq, error) for seq, error in out.failed]
        self.scheduler.commit(batch.without([seq for seq, _ in out.failed]))
        for i, (seq, token) in enumerate(zip(out.seqs, out.tokens)):
            if seq.status is not Status.RUNNING:
                continue
            try:
                seq.output_token_ids.append(token)
                logprob = None
                if out.logprobs is not None and seq.params.logprobs:
                    logprob = out.logprobs[i]
                    seq.output_logprobs.append(logprob)
                top = out.top_logprobs[i] if out.top_logprobs is not None and seq.params.top_logprobs else None
                outputs.append(self._advance(seq, token, logprob, top))
            except Exception as e:  # this request's own bookkeeping (detokenizing...): it alone fails
                outputs.append(self._fail(seq, SequenceError(f"its output failed: {e!r}")))
        return outputs

    def _advance(self, seq: Sequence, token: int, logprob: float | None,
                 top: list[tuple[int, float]] | None) -> RequestOutput:
        """Checks the stop conditions after a new token, and makes the request's delta."""
        _, detok = self._requests[seq.request_id]
        p = seq.params
        detok.add(token)
        n_out = len(seq.output_token_ids)
        reason = None
        if n_out >= p.min_tokens and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)
                                      or detok.stopped):
            reason = "stop"
        elif n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is None and seq.prefill_only:
            reason = "prefilled"
            self._held[seq.request_id] = seq
        if reason:
            self.scheduler.finish(seq, reason, keep_blocks=reason == "prefilled")
            del self._requests[seq.request_id]
        # A prefilled request goes on elsewhere: text held back for stop strings stays held.
        return RequestOutput(seq.request_id, [token], detok.delta(final=reason not in (None, "prefilled")),
                             None if logprob is None else [logprob], reason is not None, reason,
                             seq.num_prompt_tokens, n_out, top_logprobs=None if top is None else [top])

    def _fail(self, seq: Sequence, error: SequenceError) -> RequestOutput:
        """Ends a request that failed in a step, freeing its blocks (held ones too)."""
        log.warning("request %s failed: %s", seq.request_id, error)
        self.scheduler.finish(seq, "error")
        self._requests.pop(seq.request_id, None)
        self.release(seq.request_id)
        return RequestOutput(seq.request_id, [], "", None, True, "error", seq.num_prompt_tokens,
                             len(seq.output_token_ids), error)

    def _ended(self, seq: Sequence) -> RequestOutput:
        """The last delta of a request the scheduler ended (it already freed the blocks)."""
        _, detok = self._requests.pop(seq.request_id)
        return RequestOutput(seq.request_id, [], detok.delta(final=True), None, True, seq.finish_reason,
                             seq.num_prompt_tokens, len(seq.output_token_ids))

    # -- conveniences --------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[Completion]:
        """Runs the prompts together to completion (offline batch); other requests run along."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        rids: list[str] = []
        try:
            for p, sp in zip(prompts, plist):
                rids.append(self.add_request(p, sp))
                self._inboxes[rids[-1]] = deque()
            seqs = {rid: self._requests[rid][0] for rid in rids}
            # Draining one request's outputs steps the whole batch; the others' wait in their inboxes.
            texts = {rid: "".join(o.text for o in self._outputs_of(rid)) for rid in rids}
        finally:
            for rid in rids:
                self.abort(rid)  # a no-op once finished
        return [Completion(rid, s.prompt_token_ids, s.output_token_ids, texts[rid],
                           s.finish_reason or "", s.output_logprobs if s.params.logprobs else None)
                for rid, s in seqs.items()]

    def stream(self, prompt: str | list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """One request's deltas as they come (other requests in the engine run along)."""
        rid = self.add_request(prompt, params)
        try:
            yield from self._outputs_of(rid)
        finally:
            self.abort(rid)  # a no-op once finished; frees the blocks if the caller stopped early

    def _outputs_of(self, rid: str) -> Iterator[RequestOutput]:
        """rid's outputs, stepping the engine when none is waiting; outputs of other
        `stream`/`generate` requests go to their inboxes, those of plain `step` callers are dropped."""
        inbox = self._inboxes.setdefault(rid, deque())
        try:
            while True:
                while inbox:
                    o = inbox.popleft()
                    if o.error is not None:
                        raise o.error
                    yield o
                    if o.finished:
                        return
                if rid not in self._requests:
                    return  # aborted by someone else
                for o in self.step():
                    box = self._inboxes.get(o.request_id)
                    if box is not None:
                        box.append(o)
        finally:
            self._inboxes.pop(rid, None)
