"""A mesh actor and a tensor-parallel engine: refused until KV transfer covers sharded engines."""
from __future__ import annotations

import asyncio

import pytest

from mesh.actor import MeshActor
from mesh.errors import MeshError


def test_an_actor_refuses_a_tensor_parallel_engine_with_a_clear_error(checkpoint):
    actor = MeshActor({"actor_id": "p0", "scenario": "s", "role": "prefill",
                       "engine": {"model": str(checkpoint("llama", "float32")), "tensor_parallel_size": 2}})
    with pytest.raises(MeshError, match="invalid_argument: mesh actors run tensor_parallel_size 1 only"):
        asyncio.run(actor.start())
    assert actor.engine is None  # refused before any engine or worker rank started
