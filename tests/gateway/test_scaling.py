"""Autoscaling asks the local Ray's autoscaler for resources (gateway.scaling): the standing
request, read back where Ray's autoscaler reads it (the GCS key-value store), holds one bundle
per actor added and not removed."""
import asyncio
import json

import pytest

from gateway.scaling import RayScaling
from mesh import Hardware, Role
from scenarios.autoscale import ScaleAction

HARDWARE = {Role.PREFILL: Hardware(num_cpus=2, resources={"pdmesh_prefill": 1}),
            Role.DECODE: Hardware(num_cpus=1, num_gpus=1)}


def standing_request() -> list[dict]:
    """What `request_resources` left for Ray's autoscaler (v1: the GCS key-value store)."""
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    assert not is_autoscaler_v2(), "autoscaler v2: its requests are read through the GCS autoscaler state"
    return json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"[]")


class Inner:
    """The live connector's stand-in: records what it applies; an add of a role in `refuse` fails."""

    def __init__(self, refuse=()):
        self.applied, self.refuse = [], set(refuse)

    async def apply(self, action):
        if action.kind == "add" and action.role in self.refuse:
            raise RuntimeError("no node has room")
        self.applied.append(action)


def test_scale_out_requests_and_scale_in_releases_ray_resources(ray_cluster):
    scaling = RayScaling(Inner(), lambda scenario, role: HARDWARE[role])
    add = lambda role: asyncio.run(scaling.apply(ScaleAction("add", "chat", role)))  # noqa: E731
    add(Role.PREFILL)
    add(Role.DECODE)
    assert standing_request() == [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 2.0, "pdmesh_prefill": 1.0}]  # decode first
    asyncio.run(scaling.apply(ScaleAction("remove", "chat", Role.DECODE, "chat-d1")))
    assert standing_request() == [{"CPU": 2.0, "pdmesh_prefill": 1.0}]
    asyncio.run(scaling.apply(ScaleAction("remove", "chat", Role.PREFILL, "chat-p1")))
    assert standing_request() == [] and len(scaling.inner.applied) == 4


def test_a_failed_add_takes_its_request_back(ray_cluster):
    scaling = RayScaling(Inner(refuse={Role.DECODE}), lambda scenario, role: HARDWARE[role])
    asyncio.run(scaling.apply(ScaleAction("add", "chat", Role.PREFILL)))
    with pytest.raises(RuntimeError, match="no node has room"):
        asyncio.run(scaling.apply(ScaleAction("add", "chat", Role.DECODE)))
    assert standing_request() == [{"CPU": 2.0, "pdmesh_prefill": 1.0}]
    asyncio.run(scaling.apply(ScaleAction("remove", "chat", Role.PREFILL, "chat-p1")))
    assert standing_request() == []
