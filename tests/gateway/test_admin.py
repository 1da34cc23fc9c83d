"""The admin service with the generated client: pools and actors, add and remove an actor,
bad operations answered with their status and a message, the role limits (refusals, --force
with a warning), and one-line answers about dead actors."""
from __future__ import annotations

import grpc
import pytest

from gateway.ops_client import WARNING_KEY
from gateway.proto import admin_pb2 as pb
from gateway.proto import admin_pb2_grpc
from tests.gateway.support import ADMIN, API_KEY, kill, replacement_of


@pytest.fixture
def admin(restored):
    """The admin client of the shared gateway, which is put back as it was after each test."""
    with grpc.insecure_channel(restored.grpc_address) as channel:
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
        (lambda: admin.FlipActor(pb.FlipActorRequest(actor_id=prefill.actor_id, role="all"), metadata=ADMIN,
                                 timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
         "role must be one of prefill, decode, both"),
        (lambda: admin.FlipActor(pb.FlipActorRequest(actor_id=prefill.actor_id, role="both"), metadata=ADMIN,
                                 timeout=10), grpc.StatusCode.FAILED_PRECONDITION,
         "scenario 'default' is disaggregated, its actors serving as prefill or decode"),
        (lambda: admin.FlipActor(pb.FlipActorRequest(actor_id="ghost", role="decode"), metadata=ADMIN, timeout=10),
         grpc.StatusCode.NOT_FOUND, "no actor 'ghost'"),
        (lambda: admin.RemoveActor(pb.RemoveActorRequest(actor_id=prefill.actor_id), metadata=ADMIN, timeout=10),
         grpc.StatusCode.FAILED_PRECONDITION, "would have 0 serving prefill actor(s), below its minimum of 1"),
        (lambda: admin.DrainActor(pb.DrainActorRequest(actor_id=prefill.actor_id, timeout_s=-1), metadata=ADMIN,
                                  timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "a timeout must be >= 0"),
    ]
    for call, code, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert (info.value.code(), message in info.value.details()) == (code, True), info.value.details()


def _actors(admin) -> list:
    return list(admin.ListPools(pb.ListPoolsRequest(), metadata=ADMIN, timeout=30).pools[0].actors)


def _only(admin, role: str):
    [actor] = [a for a in _actors(admin) if a.role == role]
    return actor


def test_the_only_decode_actor_is_not_flipped_drained_or_removed(admin):
    decode = _only(admin, "decode")
    for call in (lambda: admin.FlipActor(pb.FlipActorRequest(actor_id=decode.actor_id, role="prefill"),
                                         metadata=ADMIN, timeout=30),
                 lambda: admin.DrainActor(pb.DrainActorRequest(actor_id=decode.actor_id), metadata=ADMIN, timeout=30),
                 lambda: admin.RemoveActor(pb.RemoveActorRequest(actor_id=decode.actor_id), metadata=ADMIN,
                                           timeout=30)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (f"scenario 'default' would have 0 serving decode actor(s), below its minimum of 1 (limits.decode.min "
                f"in its scenario file): start another decode actor first (`pdmesh add default decode`), or lower "
                f"limits.decode.min; or force it (--force)") in info.value.details()
    assert _only(admin, "decode").state == "serving"


def test_a_forced_flip_of_the_only_decode_actor_warns_and_the_flip_back_does_not(admin):
    decode = _only(admin, "decode")
    flipped, call = admin.FlipActor.with_call(pb.FlipActorRequest(actor_id=decode.actor_id, role="prefill", force=True),
                                              metadata=ADMIN, timeout=60)
    assert flipped.role == "prefill" and flipped.state == "serving"
    warnings = [v for k, v in call.trailing_metadata() if k == WARNING_KEY]
    assert warnings == [f"forced to flip {decode.actor_id} to prefill: scenario 'default' would have 0 serving "
                        f"decode actor(s), below its minimum of 1 (limits.decode.min in its scenario file): start "
                        f"another decode actor first (`pdmesh add default decode`), or lower limits.decode.min"]
    back, call = admin.FlipActor.with_call(pb.FlipActorRequest(actor_id=decode.actor_id, role="decode"),
                                           metadata=ADMIN, timeout=60)
    assert back.role == "decode" and not [k for k, _ in call.trailing_metadata() if k == WARNING_KEY]


def test_operations_on_a_dead_actor_answer_in_one_line(admin, gateway):
    original = {a.actor_id for a in _actors(admin)}
    added = admin.AddActor(pb.AddActorRequest(scenario="default", role="decode"), metadata=ADMIN, timeout=120)
    pool = gateway.gateway.fleet.scenarios["default"].pool
    kill(pool.members[added.actor_id].handle)
    for call in (lambda: admin.FlipActor(pb.FlipActorRequest(actor_id=added.actor_id, role="prefill"),
                                         metadata=ADMIN, timeout=60),
                 lambda: admin.DrainActor(pb.DrainActorRequest(actor_id=added.actor_id), metadata=ADMIN, timeout=60)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        # the pool's supervisor may have dropped the dead actor already: then it is not found
        assert (info.value.code(), info.value.details()) in {
            (grpc.StatusCode.UNAVAILABLE, f"actor {added.actor_id} is dead: nothing was changed (`pdmesh status` "
                                          "lists the pool's actors)"),
            (grpc.StatusCode.NOT_FOUND, f"no actor {added.actor_id!r}; `pdmesh status` lists the actors")}
    replacement = replacement_of(gateway, added.actor_id)  # the supervisor replaced it
    admin.RemoveActor(pb.RemoveActorRequest(actor_id=replacement), metadata=ADMIN, timeout=60)
    assert {a.actor_id for a in _actors(admin)} == original
