"""Health follows the mesh: a killed actor shows as dead in /metrics and /health (503 with the
scenario and the reason, gRPC NOT_SERVING) while its scenario cannot serve, and the gateway
is healthy again once the supervisor's replacement serves. Here the replacement cannot start
(a broken checkpoint path) until the test mends it, so that the unhealthy window is the
test's to look at, not a matter of timing."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.api import ActorReport, ActorState, Role
from tests.gateway.support import serving, tiny_config
from tests.mesh.support import replaced


@pytest.fixture(scope="module")
def running(checkpoint, ray_cluster):
    from gateway.config import Limits

    with serving(tiny_config(checkpoint, Limits())) as gw:
        yield gw


def http_health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def grpc_health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


async def first_failed_start(pool, dead_id: str) -> ActorReport:
    while (pool.offline.get(dead_id) or pool.members[dead_id]).life.last_error is None:
        await pool.changed(60)
    return pool.offline[dead_id].info


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_dead_decode_actor_makes_the_gateway_unhealthy_until_replaced(running):
    assert http_health(running.http_url)[0] == 200
    pool = running.gateway.fleet.scenarios["default"].pool
    good = pool.spec.engine
    pool.spec.engine = good.model_copy(update={"model": "/nonexistent/checkpoint"})
    try:
        [dead] = pool.by_role(Role.DECODE)
        ray.kill(dead.handle, no_restart=True)
        info = running.run(first_failed_start(pool, dead.actor_id))
        assert info.state is ActorState.DEAD
    finally:
        pool.spec.engine = good  # the next start (after a backoff) succeeds
    status, body = http_health(running.http_url)
    assert status == 503
    [problem] = body["problems"]
    assert "scenario 'default' has no serving decode actor" in problem and dead.actor_id in problem
    assert "dead" in problem
    assert grpc_health(running.grpc_address) == health_pb2.HealthCheckResponse.NOT_SERVING
    with urllib.request.urlopen(running.http_url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert metric(text, "pdmesh:actors", scenario="default", role="decode", state="dead") == 1
    new = running.run(replaced(pool, dead.actor_id))
    assert new.info.state is ActorState.SERVING
    assert http_health(running.http_url)[0] == 200
    for _ in range(100):  # the gRPC answer follows once the health task the replacement scheduled ran
        if grpc_health(running.grpc_address) == health_pb2.HealthCheckResponse.SERVING:
            break
        running.run(asyncio.sleep(0.05))
    assert grpc_health(running.grpc_address) == health_pb2.HealthCheckResponse.SERVING
