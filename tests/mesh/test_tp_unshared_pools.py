"""A mesh actor whose tensor-parallel worker ranks' KV pools cannot be shared with its process
(an NPU whose torch_npu has no IPC) refuses to start, with the engine's reason and what to do;
its worker ranks are stopped. Run in this process (MeshActor is a plain class until Ray wraps
it), so the device's lack of IPC can be stood in for: torch_npu is not installed here."""
from __future__ import annotations

import pytest
import torch

from mesh.actor import MeshActor
from mesh.api import ActorSpec, EngineConfig, Role
from mesh.engine import shared_pool
from mesh.engine.ranks import LocalRanks
from mesh.errors import MeshError
from transport import TransportConfig


async def test_an_actor_refuses_tp_when_its_ranks_pools_cannot_be_shared(checkpoint, monkeypatch):
    if hasattr(torch.UntypedStorage, "_share_npu_"):
        pytest.skip("this torch_npu has IPC: NPU pools are shared")
    real = shared_pool.mechanism
    monkeypatch.setattr(shared_pool, "mechanism", lambda device_type: real("npu"))  # the NPU's answer, on CPU
    started: list[LocalRanks] = []
    init = LocalRanks.__init__

    def keep(self, *args, **kwargs):
        started.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(LocalRanks, "__init__", keep)
    engine = EngineConfig(model=str(checkpoint("llama")), dtype="float32", device="cpu", num_blocks=64,
                          block_size=4, threads=1, tensor_parallel_size=2)
    actor = MeshActor(ActorSpec("t-d0", "t", Role.DECODE, engine, TransportConfig(backend="local"), warmup=False))
    with pytest.raises(MeshError) as refused:
        await actor.start()
    assert refused.value.code == "invalid_argument"
    assert "tensor-parallel worker ranks on npu cannot be shared" in refused.value.message
    assert "Run prefill and decode at tensor_parallel_size 1 (one NPU per actor), or use " \
           "`pdmesh generate --tensor-parallel-size N`" in refused.value.message
    assert [p.poll() is not None for p in started[0]._procs.values()] == [True], "a worker rank outlived the refusal"
