"""`pdmesh doctor` against what this machine really has: torch, UCX as its own `ucx_info`
tool lists it, the RDMA devices the kernel shows, and the live Ray cluster's nodes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from transport.ucx_report import UcxReport, UcxResource, parse_context_info


def doctor(*args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "doctor", "--output", "json", *args],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    return proc.returncode, json.loads(proc.stdout)


def value(report: dict, area: str, name: str) -> str:
    return next(f["value"] for f in report["findings"] if f["area"] == area and f["name"] == name)


def ucx_info_devices() -> set[tuple[str, str]]:
    """(transport, device) pairs from the UCX wheel's own ucx_info -d: a second opinion."""
    import libucx

    root = Path(libucx.__file__).parent
    out = subprocess.run([root / "bin" / "ucx_info", "-d"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LD_LIBRARY_PATH": str(root / "lib"), "UCX_WARN_UNUSED_ENV_VARS": "n"})
    return set(re.findall(r"Transport: (\S+)\s+#\s+Device: (\S+)", out.stdout))


@pytest.fixture(scope="module")
def live(ray_cluster):
    import ray

    code, report = doctor("--ray-address", ray.get_runtime_context().gcs_address)
    assert code == 0, report
    return report


def test_torch_and_devices_are_this_machines(live):
    import torch

    assert value(live, "torch", "version") == torch.__version__
    cuda = value(live, "torch", "cuda devices")
    assert (cuda != "none") == torch.cuda.is_available()


def test_ucx_transports_match_ucx_info(live):
    pairs = ucx_info_devices()
    assert pairs, "ucx_info listed no transport"
    assert value(live, "ucx", "transports") == ", ".join(sorted({t for t, _ in pairs}))
    nics = sorted(os.listdir("/sys/class/infiniband")) if os.path.isdir("/sys/class/infiniband") else []
    assert value(live, "ucx", "rdma nics") == (", ".join(nics) or "none")


def test_ray_nodes_are_the_clusters(live):
    import ray

    alive = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    shown = {f["name"].removeprefix("node ") for f in live["findings"] if f["area"] == "ray" and
             f["name"].startswith("node ")}
    assert shown == alive
    assert value(live, "ray", "cluster") == ray.get_runtime_context().gcs_address


def test_a_bad_config_is_an_error_naming_the_field(tmp_path, checkpoint):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"scenarios:\n  - name: chat\n    model: {checkpoint()}\n    prefil: 2\n")
    code, report = doctor("--ray-address", "127.0.0.1:1", "--config", str(bad))
    assert code == 1 and not report["ok"]
    error = next(f for f in report["findings"] if f["area"] == "config")
    assert error["level"] == "error" and "prefil" in error["value"]


def test_rdma_nics_without_ib_transports_warn():
    tcp_only = UcxReport("1.21.0", (UcxResource("tcp", "eth0"),), ("mlx5_0",))
    assert tcp_only.rdma_unused and not tcp_only.has_ib
    verbs = UcxReport("1.21.0", (UcxResource("rc_mlx5", "mlx5_0:1"), UcxResource("tcp", "eth0")), ("mlx5_0",))
    assert not verbs.rdma_unused and verbs.has_ib


def test_context_info_is_parsed():
    text = ("#      resource 0  :  md 0  dev 0  flags -- self/memory\n"
            "#      resource 1  :  md 1  dev 1  flags -- rc_mlx5/mlx5_0:1\n"
            "#      resource 2  :  md 2  dev 2  flags -- cuda_ipc/cuda\n")
    assert parse_context_info(text) == (UcxResource("self", "memory"), UcxResource("rc_mlx5", "mlx5_0:1"),
                                        UcxResource("cuda_ipc", "cuda"))


def test_kv_receivers_advertise_what_an_actor_here_would(live):
    from transport.address import interface_of

    # This host's address as Ray finds it outside a cluster (this process is in the loopback one).
    node_ip = subprocess.run([sys.executable, "-c", "import ray.util; print(ray.util.get_node_ip_address())"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    assert value(live, "network", "node address") == node_ip
    shown = next(f for f in live["findings"] if f["name"] == "KV receivers advertise")
    assert shown["value"].startswith(f"{node_ip} (") and f"NIC {interface_of(node_ip)}" in shown["value"]
    assert shown["level"] == ("warn" if node_ip.startswith("127.") else "ok")


def test_a_node_override_is_what_receivers_advertise():
    env = {**os.environ, "PDMESH_KV_INTERFACE": "lo"}
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "doctor", "--output", "json", "--ray-address",
                           "127.0.0.1:1"], capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).parents[2])
    shown = next(f for f in json.loads(proc.stdout)["findings"] if f["name"] == "KV receivers advertise")
    assert shown["value"] == "127.0.0.1 (from PDMESH_KV_INTERFACE; NIC lo)" and shown["level"] == "warn"
