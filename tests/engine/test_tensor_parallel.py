"""Tensor parallelism on CPU with gloo: real worker processes, real collectives.

Rank 0's logits are checked against transformers (as in test_numerics_vs_hf) and against
the same engine at TP=1; greedy tokens must be identical; each rank must hold about half
the weights and KV; a rank that dies or hangs must fail the engine with a clear error.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from click.testing import CliRunner

from gateway.cli import main

from mesh.engine import checkpoint as loader
from mesh.engine.errors import CheckpointError
from mesh.engine.model_config import ModelConfig
from mesh.engine.parallel import Collectives, TensorParallelError, check_devices
from mesh.engine.rank import RankMemory
from mesh.engine.sampling_params import SamplingParams
from mesh.engine.shard import Shard
from tests.engine.helpers import FAMILIES
from tests.engine.helpers import PROMPTS, hf_greedy
from tests.engine.helpers import FP32_ATOL, greedy, run_and_compare


@pytest.fixture
def tp_engine(make_engine):
    """tp_engine(folder, size, **options) -> an engine of `size` ranks, its workers stopped at the end
    (and its KV blocks leak-checked by make_engine)."""
    engines = []

    def make(folder, size: int = 2, **options):
        gpus = torch.cuda.device_count()
        if options.get("device", os.environ.get("PDMESH_TEST_DEVICE", "cpu")) == "cuda" and gpus < size:
            pytest.skip(f"TP={size} on CUDA needs {size} GPUs, one per rank (NCCL); {gpus} here")
        engine = make_engine(folder, tensor_parallel_size=size, **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
        assert all(p.poll() is not None for p in engine.ranks._procs.values()), "a worker rank outlived close()"


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_logits_match_transformers_and_tp1(family, checkpoint, hf_model, make_engine, tp_engine):
    folder = checkpoint(family)
    options = dict(block_size=4, num_blocks=128, max_num_batched_tokens=16)  # chunked, mixed steps
    tp2 = tp_engine(folder, 2, **options)
    rec2 = run_and_compare(tp2, hf_model(folder), n_tokens=8, atol=FP32_ATOL)
    rec1 = run_and_compare(make_engine(folder, **options), hf_model(folder), n_tokens=8, atol=FP32_ATOL)
    assert rec2.mixed_steps > 0, "no step mixed decodes with prefill chunks"
    for rid1, rid2 in zip(rec1.logits, rec2.logits):
        diff = (rec1.stacked(rid1) - rec2.stacked(rid2)).abs().max().item()
        assert diff <= FP32_ATOL, f"TP=2 vs TP=1: max |logit diff| {diff:.2e}"


def test_greedy_tokens_identical_at_tp1_tp2_and_transformers(checkpoint, hf_model, make_engine, tp_engine):
    folder = checkpoint("qwen2")  # biases, tied embeddings: the vocab-parallel LM head is the embedding shard
    tp1, tp2 = make_engine(folder), tp_engine(folder, 2)
    prompt_ids = [tp1.tokenizer.encode(p) for p in PROMPTS]
    one = [c.token_ids for c in tp1.generate(prompt_ids, greedy(32))]
    two = [c.token_ids for c in tp2.generate(prompt_ids, greedy(32))]
    assert two == one
    hf = hf_model(folder)
    assert one == [hf_greedy(hf, ids, 32) for ids in prompt_ids]


def test_more_ranks_than_kv_heads_replicate_them(checkpoint, hf_model, make_engine, tp_engine):
    """4 ranks, 2 KV heads: ranks 0-1 hold head 0, ranks 2-3 head 1 (as vLLM replicates them)."""
    folder = checkpoint("llama")
    tp4 = tp_engine(folder, 4, max_num_batched_tokens=16)
    assert ModelConfig.from_folder(folder).num_kv_heads == 2 and tp4.kv.shape.num_kv_heads == 1
    run_and_compare(tp4, hf_model(folder), n_tokens=6, atol=FP32_ATOL, prompts=PROMPTS[:3])
    prompt_ids = [tp4.tokenizer.encode(p) for p in PROMPTS]
    assert [c.token_ids for c in tp4.generate(prompt_ids, greedy(16))] == \
        [c.token_ids for c in make_engine(folder).generate(prompt_ids, greedy(16))]


def test_each_rank_holds_about_half_the_weights_and_kv(checkpoint, make_engine, tp_engine):
    folder = checkpoint("llama")
    one = make_engine(folder, num_blocks=64)
    tp2 = tp_engine(folder, 2, num_blocks=64)
    whole = RankMemory.of(one.model, one.kv)
    ranks = tp2.ranks.memory
    print(f"\nTP=1: {whole}\nTP=2: {ranks}")  # the figures docs/benchmarks.md quotes
    assert len(ranks) == 2 and ranks[0] == RankMemory.of(tp2.model, tp2.kv)
    for rank in ranks:
        assert rank.kv_bytes * 2 == whole.kv_bytes
        # Norms (a few KB) are whole on every rank; everything else is split.
        assert 0.5 <= rank.weight_bytes / whole.weight_bytes <= 0.52, rank


def test_a_rank_loads_only_its_slices_of_the_checkpoint(checkpoint, monkeypatch):
    folder = checkpoint("qwen3")  # qk norms and separate LM head
    cfg = ModelConfig.from_folder(folder)
    read: list[int] = []
    take = loader._Tensors.take

    def counting_take(self, name, rows=None, cols=None):
        t = take(self, name, rows, cols)
        read.append(t.numel())
        return t

    monkeypatch.setattr(loader._Tensors, "take", counting_take)
    whole = loader.load_model(folder, cfg, 64, torch.float32, torch.device("cpu"))
    read_whole, read[:] = sum(read), []
    shard = loader.load_model(folder, cfg, 64, torch.float32, torch.device("cpu"), Shard(1, 2), Collectives(1, 2))
    assert sum(read) <= 0.52 * read_whole, "rank 1 read more than its half of the checkpoint"
    d, layer, part = cfg.head_dim, whole.layers[0], shard.layers[0]
    q_rows, kv_rows = cfg.num_heads * d, cfg.num_kv_heads * d
    qkv = layer.qkv_proj.weight
    expect = torch.cat([qkv[q_rows // 2:q_rows], qkv[q_rows + kv_rows // 2:q_rows + kv_rows],
                        qkv[q_rows + kv_rows + kv_rows // 2:]])
    assert torch.equal(part.qkv_proj.weight, expect)
    assert torch.equal(part.o_proj.weight, layer.o_proj.weight[:, q_rows // 2:])
    inter = cfg.intermediate_size
    assert torch.equal(part.down_proj.weight, layer.down_proj.weight[:, inter // 2:])
    assert torch.equal(shard.lm_head_t, whole.lm_head_t[:, cfg.vocab_size // 2:])


def test_shard_arithmetic_and_clear_errors_for_sizes_that_do_not_split(checkpoint):
    cfg = ModelConfig.from_folder(checkpoint("llama"))  # 4 heads, 2 KV heads, MLP 128, vocab 1024
    assert [Shard(r, 4).kv_heads(cfg) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [Shard(r, 2).heads(cfg) for r in range(2)] == [range(0, 2), range(2, 4)]
    odd = cfg.__class__(**{**cfg.__dict__, "vocab_size": 1001})
    assert [Shard(r, 2).vocab(odd) for r in range(2)] == [range(0, 501), range(501, 1001)]
    with pytest.raises(CheckpointError, match="4 attention heads do not split across 3"):
        Shard(0, 3).check(cfg)
    with pytest.raises(CheckpointError, match="4 attention heads do not split across 8"):
        Shard(0, 8).check(cfg)


def test_cuda_ranks_each_need_a_gpu_of_their_own(monkeypatch):
    """NCCL refuses two ranks on one GPU: said before any worker starts, with what to change."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(TensorParallelError, match=r"2 tensor-parallel ranks on CUDA need 2 GPUs \(NCCL refuses two "
                                                  r"ranks on one GPU\), this process sees 1 \(CUDA_VISIBLE_DEVICES\)"):
        check_devices(torch.device("cuda"), 2)
    check_devices(torch.device("cuda"), 1)
    check_devices(torch.device("cpu"), 4)


def test_engine_rejects_a_size_the_model_cannot_split_before_starting_workers(checkpoint, make_engine):
    with pytest.raises(CheckpointError, match="do not split across 3 tensor-parallel ranks"):
        make_engine(checkpoint("llama"), tensor_parallel_size=3)


def _stepped_engine(tp_engine, folder):
    """A TP=2 engine after one healthy step (the group works), its request still running."""
    engine = tp_engine(folder, 2, collective_timeout_s=5)
    rid = engine.add_request("def add(a, b):", SamplingParams(max_tokens=4, temperature=0))
    engine.step()
    return engine, rid, engine.ranks._procs[1]


def test_a_killed_rank_fails_the_engine_naming_it(checkpoint, tp_engine):
    engine, rid, worker = _stepped_engine(tp_engine, checkpoint("llama"))
    worker.kill()
    worker.wait()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(exit code -9\).*the engine cannot go on"):
        engine.step()
    with pytest.raises(TensorParallelError, match="the engine cannot go on"):
        engine.step()  # and stays failed, at once
    engine.abort(rid)


def test_a_hung_rank_fails_the_engine_at_the_collective_timeout(checkpoint, tp_engine):
    engine, rid, worker = _stepped_engine(tp_engine, checkpoint("llama"))
    os.kill(worker.pid, signal.SIGSTOP)  # alive but never answering: only the timeout can end the wait
    with pytest.raises(TensorParallelError, match="all-reduce failed on rank 0 of 2.*the engine cannot go on"):
        engine.step()
    assert worker.wait(5) == -signal.SIGKILL, "the hung rank was not stopped"
    engine.abort(rid)


def test_generate_command_at_tp2_prints_what_tp1_prints(checkpoint):
    folder = str(checkpoint("llama"))
    args = ["generate", "def add(a, b):", "--model", folder, "--dtype", "float32", "--device", "cpu",
            "--kv-cache-gb", "0.01", "--max-tokens", "12", "--ignore-eos"]
    one, two = (CliRunner().invoke(main, args + ["--tensor-parallel-size", n], catch_exceptions=False)
                for n in ("1", "2"))
    assert one.exit_code == two.exit_code == 0, two.output
    assert two.stdout == one.stdout and "[12 tokens, finish: length" in two.stderr


def test_bench_engine_at_tp2_reports_both_degrees_and_what_tp_costs(checkpoint):
    folder = checkpoint("llama")
    result = CliRunner().invoke(main, ["bench", "engine", "--model", str(folder), "--dtype", "float32",
                                       "--tensor-parallel-size", "2", "--repeats", "1", "--batches", "1,2",
                                       "--kv-cache-gb", "0.01", "--output", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert set(figures["prefill_tokens_per_s"]) == {"TP=1", "TP=2"}
    layers = ModelConfig.from_folder(folder).num_layers
    for b in ("1", "2"):
        decode = figures["decode"][b]
        assert decode["ms_per_step"]["TP=1"] > 0 and decode["ms_per_step"]["TP=2"] > 0
        # o and down per layer, the embedding, the logits
        assert decode["collectives_per_step"] == 2 * layers + 2 and decode["collective_ms_per_step"] > 0
    whole, ranks = figures["memory"]["TP=1"], figures["memory"]["TP=2"]
    assert [r["kv_bytes"] * 2 for r in ranks] == [whole["kv_bytes"]] * 2


def test_a_closed_engine_refuses_to_step_instead_of_waiting_for_its_ranks(checkpoint, tp_engine):
    engine, rid, worker = _stepped_engine(tp_engine, checkpoint("llama"))
    engine.close()
    assert worker.returncode == 0, "the worker did not stop cleanly on close"
    with pytest.raises(TensorParallelError, match="the engine was closed"):
        engine.step()
    engine.abort(rid)
