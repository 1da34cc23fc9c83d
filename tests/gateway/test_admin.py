"""The admin service with the generated client: pools and actors, add and remove an actor,
and bad operations answered with their status and a message."""
from __future__ import annotations

import grpc
import pytest

from gateway.proto import admin_pb2 as pb
from gateway.proto import admin_pb2_grpc
from tests.gateway.conftest import ADMIN_KEY, API_KEY

ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)


@pytest.fixture(scope="module")
def admin(gateway):
    with grpc.insecure_channel(gateway.grpc_address) as channel:
        yield admin_pb2_grpc.AdminStub(channel)


def test_list_pools_shows_every_actor_with_its_load(admin):
    pools = admin.ListPools(pb.ListPoolsRequest(), metadata=ADMIN, timeout=30).pools
    assert [p.scenario for p in pools] == ["default"]
    actors = {a.role: a for a in pools[0].actors}
    assert set(actors) == {"prefill", "decode"}
    decode = actors["decode"]
    assert decode.state == "serving" and decode.pid > 0 and decode.device == "cpu" and decode.load.num_blocks == 128


def test_add_then_remove_a_decode_actor(admin):
    added = admin.AddActor(pb.AddActorRequest(scenario="default", role="decode"), metadata=ADMIN, timeout=120)
    assert added.role == "decode" and added.state == "serving"
    roles = [a.role for a in admin.ListPools(pb.ListPoolsRequest(scenario="default"), metadata=ADMIN,
                                             timeout=30).pools[0].actors]
    assert sorted(roles) == ["decode", "decode", "prefill"]
    assert admin.RemoveActor(pb.RemoveActorRequest(actor_id=added.actor_id), metadata=ADMIN,
                             timeout=60).actor_id == added.actor_id


def test_bad_admin_calls(admin):
    prefill = next(a for a in admin.ListPools(pb.ListPoolsRequest(), metadata=ADMIN, timeout=30).pools[0].actors
                   if a.role == "prefill")
    cases = [
        (lambda: admin.ListPools(pb.ListPoolsRequest(), timeout=10), grpc.StatusCode.UNAUTHENTICATED,
         "missing admin key"),
        (lambda: admin.ListPools(pb.ListPoolsRequest(), metadata=(("authorization", f"Bearer {API_KEY}"),),
                                 timeout=10), grpc.StatusCode.UNAUTHENTICATED, "wrong admin key"),
        (lambda: admin.ListPools(pb.ListPoolsRequest(scenario="nope"), metadata=ADMIN, timeout=10),
         grpc.StatusCode.NOT_FOUND, "unknown scenario 'nope'"),
        (lambda: admin.FlipActor(pb.FlipActorRequest(actor_id=prefill.actor_id, role="both"), metadata=ADMIN,
                                 timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "role must be one of prefill, decode"),
        (lambda: admin.FlipActor(pb.FlipActorRequest(actor_id="ghost", role="decode"), metadata=ADMIN, timeout=10),
         grpc.StatusCode.NOT_FOUND, "no actor 'ghost'"),
        (lambda: admin.RemoveActor(pb.RemoveActorRequest(actor_id=prefill.actor_id), metadata=ADMIN, timeout=10),
         grpc.StatusCode.FAILED_PRECONDITION, "is the last prefill actor"),
        (lambda: admin.DrainActor(pb.DrainActorRequest(actor_id=prefill.actor_id, timeout_s=-1), metadata=ADMIN,
                                  timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "a timeout must be >= 0"),
    ]
    for call, code, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert (info.value.code(), message in info.value.details()) == (code, True), info.value.details()
