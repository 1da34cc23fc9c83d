"""Ray for the mesh: an embedded local cluster when no address is given, else an existing one.

Whoever reaches a Ray cluster's GCS port can run code in it, so both ways use Ray's token
authentication. The embedded cluster gets a token of its own for the run (in RAY_AUTH_TOKEN,
which Ray's own processes and actors inherit) unless one is given the ways Ray documents
(RAY_AUTH_TOKEN, or a file named by RAY_AUTH_TOKEN_PATH), and it listens on loopback only
unless PDMESH_RAY_NODE_IP names another address of this host. An existing cluster is joined
with the token its operator gives in the environment before the process starts, as Ray reads
it: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or Ray's default file,
~/.ray/auth_token, which Ray itself uses for a cluster found by "auto").
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
NODE_IP_ENV = "PDMESH_RAY_NODE_IP"


def connect(address: str | None = None, num_cpus: int | None = None, namespace: str = "pdmesh") -> dict:
    """Starts (address None) or joins (address "auto" or "host:port") a Ray cluster.

    The embedded cluster runs without the dashboard (0.9 GiB less memory) and
    with the machine's CPUs; custom resources such as NPU come from the nodes
    of an existing cluster. Returns the cluster's resources.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    if address is None:
        _embedded_token()
        node_ip = os.environ.get(NODE_IP_ENV) or LOOPBACK
        with _loopback_kept(node_ip == LOOPBACK):
            ray.init(namespace=namespace, include_dashboard=False, num_cpus=num_cpus or os.cpu_count(),
                     log_to_driver=True, _temp_dir=os.path.join(tempfile.gettempdir(), "pdmesh-ray"),
                     configure_logging=False, _node_ip_address=node_ip)
    else:
        # A driver joining a loopback cluster (the embedded one of another process) is on loopback too.
        with _loopback_kept(address.rpartition(":")[0] in (LOOPBACK, "localhost")):
            ray.init(address=address, namespace=namespace, log_to_driver=True, configure_logging=False)
    resources = ray.cluster_resources()
    log.info("ray: %s", ", ".join(f"{name} {_amount(name, value)}" for name, value in sorted(resources.items())
                                  if not name.startswith("node:")))
    return resources


def _amount(name: str, value: float) -> str:
    return f"{value / 2**30:.1f} GiB" if "memory" in name else f"{value:g}"


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _embedded_token() -> None:
    """A token for this run unless one is given. RAY_AUTH_MODE is left to Ray: a new local
    cluster turns token authentication on by itself (Ray >= 2.59), while a mode this process
    sets after importing Ray would not reach Ray's already loaded configuration."""
    mode = os.environ.get("RAY_AUTH_MODE", "token").lower()
    if mode != "token":
        log.warning("RAY_AUTH_MODE=%s: the embedded Ray cluster runs without authentication", mode)
        return
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        # In the environment, not Ray's default file: one token per run, shared with no other cluster.
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


@contextlib.contextmanager
def _loopback_kept(on: bool) -> Iterator[None]:
    """Ray turns a node IP of 127.0.0.1 into the host's routable address (its GCS, raylet and
    workers then listen on every interface, and a driver joining a loopback cluster looks for
    its node at the wrong address) unless it treats the host as single-node, its mode for
    laptops (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once when Ray is imported). Keep that
    mode while ray.init runs, so that loopback stays loopback."""
    from ray._private import ray_constants

    if not on:
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
