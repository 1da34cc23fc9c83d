"""The cluster's control plane and RDMA, as deploy/ says them: who may reach Ray and the KV
ports (loopback binding, the cluster's token, the NetworkPolicy), and images and pods that give
ucxx a UCX with RDMA."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy import support
from tests.deploy.support import DEPLOY


# -- the control plane: who may reach Ray and the KV ports ---------------------------------------
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _ray_pod_templates() -> dict[str, dict]:
    spec = support.kind(support.k8s("raycluster.yaml"), "RayCluster")["spec"]
    return {"head": spec["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}


def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    return selector["matchLabels"].items() <= labels.items()


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_ray_dashboard_listens_on_loopback_or_not_at_all():
    head = support.kind(support.k8s("raycluster.yaml"), "RayCluster")["spec"]["headGroupSpec"]
    params = head["rayStartParams"]
    assert params.get("include-dashboard") == "false" or params.get("dashboard-host") in LOOPBACK, params
    ports = head["template"]["spec"]["containers"][0]["ports"]
    assert [p["name"] for p in ports] == ["gcs"], "the head offers only the GCS to other pods"
    launcher = support.load_yaml(DEPLOY / "ray/cluster.yaml")[0]
    head_start = " ".join(launcher["head_start_ray_commands"])
    host = re.search(r"--dashboard-host[= ](\S+)", head_start)
    assert "--include-dashboard=false" in head_start or (host and host.group(1) in LOOPBACK), head_start


def test_every_ray_node_and_the_gateway_present_the_clusters_token():
    """RAY_AUTH_MODE=token everywhere (Ray refuses clients without the token), and the token
    from the one Secret the example shows how to create."""
    secrets = {d["metadata"]["name"]: d for d in support.k8s("secret.example.yaml") if d["kind"] == "Secret"}
    _, gateway, _ = support.gateway()
    containers = {f"ray {name}": t["spec"]["containers"][0] for name, t in _ray_pod_templates().items()}
    tokens = set()
    for where, container in {**containers, "gateway": gateway}.items():
        env = _env(container)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]]["stringData"], where
        tokens.add((ref["name"], ref["key"]))
    assert len(tokens) == 1, f"every node must hold the same token: {tokens}"
    launcher = support.load_yaml(DEPLOY / "ray/cluster.yaml")[0]
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    for command in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in command, command
    assert "~/.ray/auth_token" in launcher["file_mounts"], "the token must reach every node"


def test_network_policy_admits_only_the_gateway_and_ray_pods():
    """Ray's pods take connections only from each other and the gateway (Ray's ports and the
    KV receivers' are random, so the peers are named, not the ports); the gateway takes
    clients only on its Service's ports, and the rest only from Ray's pods."""
    policies = [d for d in support.k8s("networkpolicy.yaml") if d["kind"] == "NetworkPolicy"]
    deployment, container, service = support.gateway()
    gateway_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ray_labels = [t["metadata"]["labels"] for t in _ray_pod_templates().values()]
    assert not any(_matches(p["spec"]["podSelector"], gateway_labels) for p in policies
                   if any(_matches(p["spec"]["podSelector"], labels) for labels in ray_labels))

    def policy_for(labels: dict) -> dict:
        chosen = [p for p in policies if _matches(p["spec"]["podSelector"], labels)]
        assert len(chosen) == 1, f"pods labelled {labels}: {len(chosen)} policies"
        assert "Ingress" in chosen[0]["spec"]["policyTypes"]
        return chosen[0]

    def peers(rule: dict) -> list[dict]:
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"only pods of this mesh may be admitted: {peer}"
        return [peer["podSelector"] for peer in rule["from"]]

    ray_policy = policy_for(ray_labels[0])
    assert all(policy_for(labels) is ray_policy for labels in ray_labels)
    admitted = [s for rule in ray_policy["spec"]["ingress"] for s in peers(rule)]
    assert all(_matches(s, gateway_labels) or all(_matches(s, labels) for labels in ray_labels)
               for s in admitted), admitted
    assert any(_matches(s, gateway_labels) for s in admitted), "the gateway must reach Ray"
    assert any(all(_matches(s, labels) for labels in ray_labels) for s in admitted), "Ray must reach itself"

    gateway_policy = policy_for(gateway_labels)
    open_ports = set()
    for rule in gateway_policy["spec"]["ingress"]:
        if "from" not in rule:  # from anywhere: the client ports only
            open_ports |= {p["port"] for p in rule["ports"]}
        else:
            assert all(all(_matches(s, labels) for labels in ray_labels) for s in peers(rule))
    assert open_ports == {p["targetPort"] for p in service["spec"]["ports"]}
    assert {p["name"] for p in container["ports"]} == open_ports


def test_the_compose_stack_listens_on_loopback():
    """On the host network an address of 0.0.0.0 reaches every network the host is on."""
    compose = support.load_yaml(DEPLOY / "compose.yaml")[0]
    for name, service in compose["services"].items():
        if name == "otel-collector":
            continue  # its ports are otel-collector.yaml's, which Kubernetes set-ups share
        text = yaml.safe_dump(service)
        assert "0.0.0.0" not in text, f"{name} listens on every interface"
    assert "--web.listen-address=127.0.0.1:9090" in compose["services"]["prometheus"]["command"]
    assert compose["services"]["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] in LOOPBACK
    jaeger = compose["services"]["jaeger"]["environment"]
    assert all(v.split(":")[0] in LOOPBACK for k, v in jaeger.items() if k.endswith("HOST_PORT"))
    tempo = support.load_yaml(DEPLOY / "observability/tempo.yaml")[0]
    assert tempo["server"]["http_listen_address"] in LOOPBACK


# -- RDMA: images with a UCX that has verbs and rdmacm, pods that can use an RDMA NIC -------------
@pytest.mark.parametrize("name", ["worker-cuda", "worker-ascend"])
def test_worker_images_give_ucxx_a_ucx_with_rdma(name):
    from importlib.metadata import version

    text = (DEPLOY / f"docker/{name}.Dockerfile").read_text()
    assert re.search(r"apt-get install[^\n]*\brdma-core\b", text) and "librdmacm1" in text and "libibverbs1" in text
    assert re.search(r'build-ucx\.sh "\$\{UCX_VERSION\}" /opt/ucx', text)
    assert re.search(r"^\s*RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true", text, re.M)
    assert "/opt/ucx/lib" in text and "ucxx did not load /opt/ucx" in text  # the build checks what ucxx loads
    # the UCX built is the one the ucxx wheel was made for (its libucx wheel's version)
    wheel = next(version(d) for d in ("libucx-cu12", "libucx-cu13", "libucx") if _installed(d))
    assert support.arg_default(text, "UCX_VERSION") == wheel
    build = (DEPLOY / "docker/build-ucx.sh").read_text()
    assert "--with-verbs" in build and "--with-rdmacm" in build and "libuct_${module}.so" in build
    assert re.search(r"for module in ib rdmacm", build)


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return bool(version(dist))
    except PackageNotFoundError:
        return False


def test_accelerator_workers_may_lock_memory_for_rdma():
    groups = support.groups()
    for name in ("gpu-workers", "npu-workers"):
        caps = groups[name]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        assert "IPC_LOCK" in caps, name


def test_the_rdma_component_gives_accelerator_workers_a_device_and_host_networking(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (its kustomize) is missing")
    shutil.copytree(DEPLOY / "k8s", tmp_path / "k8s")
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay/kustomization.yaml").write_text("resources: [../k8s]\ncomponents: [../k8s/rdma]\n")
    out = subprocess.run([kubectl, "kustomize", str(tmp_path / "overlay")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    cluster = next(d for d in yaml.safe_load_all(out.stdout) if d["kind"] == "RayCluster")
    groups = {g["groupName"]: g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]}
    for name in ("gpu-workers", "npu-workers"):
        spec = groups[name]
        resources = spec["containers"][0]["resources"]
        assert resources["requests"]["rdma/hca"] == resources["limits"]["rdma/hca"] == 1, name
        assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet", name
        assert "IPC_LOCK" in spec["containers"][0]["securityContext"]["capabilities"]["add"]
    assert "hostNetwork" not in groups["cpu-workers"] and "rdma/hca" not in str(groups["cpu-workers"])
