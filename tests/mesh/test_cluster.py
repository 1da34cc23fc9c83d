"""The embedded Ray cluster's control plane: it listens on loopback only, it answers only
clients that hold the run's token, actors still start in it, and a driver of another process
joins it with the token from the environment."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gcs(ray_cluster) -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def _ray_processes() -> list[psutil.Process]:
    """This process's descendants that are Ray's: the GCS, raylet, agents and workers."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "ray" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            continue  # a worker that just exited
    return out


def _listening(procs) -> dict[int, set[str]]:
    """port -> the addresses the processes listen on there."""
    out: dict[int, set[str]] = {}
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue  # a worker that just exited
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                out.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    return out


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def test_ray_listens_on_loopback_only(gcs):
    """The GCS, the raylet, the agents and the workers: every port Ray's processes (this
    test's children) listen on is bound to loopback, and the GCS is among them."""
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def node_ip(self) -> str:
            return ray.util.get_node_ip_address()

    probe = Probe.remote()
    assert ray.get(probe.node_ip.remote()) == "127.0.0.1"  # actors start, on the loopback node
    listening = _listening(_ray_processes())
    gcs_port = int(gcs.rsplit(":", 1)[1])
    assert gcs_port in listening, f"nothing of Ray's listens on the GCS port: {listening}"
    exposed = {port: ips for port, ips in listening.items() if not all(map(_loopback, ips))}
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
    ray.kill(probe)


def _node_info(gcs: str, token: str | None):
    """A GCS call from a plain gRPC client, with this bearer token or none."""
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    with grpc.insecure_channel(gcs) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        return stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata,
                                   timeout=30)


@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_a_client_without_the_token_is_refused(gcs, token):
    with pytest.raises(grpc.RpcError) as refused:
        _node_info(gcs, token)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_runs_token_opens_the_gcs(gcs):
    token = os.environ["RAY_AUTH_TOKEN"]  # made for this run by mesh.cluster.connect
    assert len(token) == 64
    assert len(_node_info(gcs, token).node_info_list) == 1


def test_another_process_joins_with_the_token_from_its_environment(gcs, tmp_path):
    code = "import sys; from mesh.cluster import connect; print(connect(sys.argv[1])['CPU'])"
    # as an operator gives it, and no ~/.ray/auth_token to fall back on
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"], "HOME": str(tmp_path)}
    joined = subprocess.run([sys.executable, "-c", code, gcs], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert float(joined.stdout.strip().splitlines()[-1]) > 0
