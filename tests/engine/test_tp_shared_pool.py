"""Worker ranks' KV pools shared with rank 0 (mesh/engine/shared_pool.py), on real worker processes.

The mechanism follows the device: memory files on the CPU, the device's IPC handle (torch's
reduce_tensor) in the worker's Ready message on CUDA and on NPUs with torch_npu's IPC, and a
refusal that says what to do elsewhere. Rank 0's map of a worker's pool must hold exactly the
KV that worker computed: its heads of the same engine's KV at TP=1. That runs on the CPU
(memfd) here and on CUDA (IPC) where a GPU is (PDMESH_TEST_DEVICE=cuda, or any GPU host).
"""
from __future__ import annotations

import pickle

import pytest
import torch

from mesh.engine import shared_pool
from mesh.engine.errors import EngineError
from mesh.engine.rank import RankMemory
from mesh.engine.ranks import Ready
from mesh.engine.sampling_params import SamplingParams
from tests.engine.helpers import FP32_ATOL, PROMPTS, greedy

# NCCL gives each rank a GPU of its own (parallel.check_devices)
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs, one per rank (here: "
                              f"{torch.cuda.device_count()}; torch.cuda.is_available() is {torch.cuda.is_available()})")
DEVICES = ["cpu", pytest.param("cuda", marks=TWO_GPUS)]


def test_the_mechanism_follows_the_device(monkeypatch):
    assert shared_pool.mechanism("cpu") == shared_pool.MEMFD
    assert shared_pool.mechanism("cuda") == shared_pool.IPC
    if not hasattr(torch.UntypedStorage, "_share_npu_"):  # no torch_npu here, or one without IPC
        with pytest.raises(shared_pool.UnsharedPools,
                           match=r"on npu cannot be shared.*tensor_parallel_size 1 \(one NPU per actor\), or use "
                                 r"`pdmesh generate --tensor-parallel-size N`"):
            shared_pool.mechanism("npu")
    # torch_npu with IPC adds this storage method (and extends reduce_tensor to NPU tensors)
    monkeypatch.setattr(torch.UntypedStorage, "_share_npu_", lambda self: None, raising=False)
    assert shared_pool.mechanism("npu") == shared_pool.IPC


def test_a_device_pool_handle_crosses_the_control_pipe_in_the_ready_message():
    """The typed values, pickled as the pipe carries them. A CPU tensor's handle is torch's too
    (reduce_tensor), but pickling copies its storage: only a device's handle maps the memory."""
    pool = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    sent = Ready(RankMemory(10, 96), shared_pool.export_pool(pool))
    got = pickle.loads(pickle.dumps(sent))
    assert isinstance(got.pool, shared_pool.DevicePoolHandle) and got.memory == sent.memory
    assert torch.equal(shared_pool.open_pool(got.pool, (2, 3, 4), torch.float32), pool)
    with pytest.raises(EngineError, match=r"the shared KV pool is \(2, 3, 4\) torch.float32, this rank's cache is "
                                          r"\(2, 3, 8\) torch.float32: rank 0 and the worker disagree"):
        shared_pool.open_pool(got.pool, (2, 3, 8), torch.float32)
    with pytest.raises(EngineError, match="disagree on the cache's shape"):
        shared_pool.open_pool(got.pool, (2, 3, 4), torch.bfloat16)
    assert pickle.loads(pickle.dumps(Ready(RankMemory(1, 2)))).pool is None  # memfd: rank 0 made the pool


@pytest.mark.parametrize("device", DEVICES)
def test_rank_0s_map_of_a_workers_pool_holds_that_ranks_kv_heads(device, checkpoint, make_engine):
    """llama: 2 KV heads, so at TP=2 rank r holds head r. After one prefill, every rank's pool as
    rank 0 maps it equals that head of TP=1's pool, block for block: the worker wrote it there."""
    folder = checkpoint("llama")
    one, two = (make_engine(folder, device=device, tensor_parallel_size=n) for n in (1, 2))
    try:
        assert two.ranks.sharing == (shared_pool.MEMFD if device == "cpu" else shared_pool.IPC)
        assert [p.device.type for p in two.rank_pools] == [device, device]
        assert all(not p.any() for p in two.rank_pools), "a fresh pool is not zeroed"
        blocks = []
        for engine in (one, two):
            rid = engine.add_request(PROMPTS[3], SamplingParams(max_tokens=2, temperature=0), prefill_only=True)
            while engine.has_unfinished():
                engine.step()
            blocks.append(engine.held_blocks(rid))
            engine.release(rid)
        assert blocks[0] == blocks[1]
        whole = one.kv.pool[:, :, blocks[0]].cpu()
        for rank, pool in enumerate(two.rank_pools):
            part = pool[:, :, blocks[1]].cpu()
            assert part.shape[-2] == 1 and part.abs().sum() > 0
            torch.testing.assert_close(part, whole[..., rank:rank + 1, :], atol=FP32_ATOL, rtol=0)
    finally:
        two.close()


def test_pools_a_device_cannot_share_leave_the_engine_running_and_say_why(checkpoint, make_engine, monkeypatch):
    """As on an NPU without torch_npu's IPC: the ranks run (pdmesh generate) with pools of their own;
    rank_pools is None and ranks.unshared is what a mesh actor refuses with."""
    def npu_without_ipc(device_type: str) -> str:
        raise shared_pool.UnsharedPools("as on npu: run prefill and decode at tensor_parallel_size 1")

    monkeypatch.setattr(shared_pool, "mechanism", npu_without_ipc)
    folder = checkpoint("llama")
    two = make_engine(folder, tensor_parallel_size=2)
    try:
        assert two.rank_pools is None and two.ranks.pools is None
        assert two.ranks.unshared == "as on npu: run prefill and decode at tensor_parallel_size 1"
        ids = [two.tokenizer.encode(p) for p in PROMPTS]
        assert [c.token_ids for c in two.generate(ids, greedy(12))] == \
            [c.token_ids for c in make_engine(folder).generate(ids, greedy(12))]
    finally:
        two.close()


def test_the_ipc_messages_run_on_the_cpu_too(checkpoint, make_engine, monkeypatch):
    """The IPC mechanism's path (the worker told to export, its Ready carrying the handle, rank 0
    opening it against the rank's cache shape), on CPU tensors: there the handle copies the
    pool at Ready time instead of mapping it, so only the shapes and the engine's tokens count."""
    monkeypatch.setattr(shared_pool, "mechanism", lambda device_type: shared_pool.IPC)
    folder = checkpoint("llama")
    two = make_engine(folder, tensor_parallel_size=2)
    try:
        assert two.ranks.sharing == shared_pool.IPC and two.ranks.unshared is None
        assert [tuple(p.shape) for p in two.rank_pools] == [tuple(two.kv.pool.shape)] * 2
        ids = [two.tokenizer.encode(p) for p in PROMPTS]
        assert [c.token_ids for c in two.generate(ids, greedy(8))] == \
            [c.token_ids for c in make_engine(folder).generate(ids, greedy(8))]
    finally:
        two.close()
