"""A mesh actor and a tensor-parallel engine: refused until KV transfer covers sharded engines."""
from __future__ import annotations

import asyncio

import pytest

from mesh.actor import MeshActor
from mesh.api import ActorSpec, EngineConfig, Role
from mesh.errors import MeshError
from transport import TransportConfig


def test_an_actor_refuses_a_tensor_parallel_engine_with_a_clear_error(checkpoint):
    engine = EngineConfig(model=str(checkpoint("llama", "float32")), tensor_parallel_size=2)
    actor = MeshActor(ActorSpec("p0", "s", Role.PREFILL, engine, TransportConfig(backend="local")))
    with pytest.raises(MeshError, match="invalid_argument: mesh actors run tensor_parallel_size 1 only"):
        asyncio.run(actor.start())
    assert actor.engine is None  # refused before any engine or worker rank started
