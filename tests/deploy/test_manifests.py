"""Every file under deploy/ parses, and says what the code says: the images build.sh makes,
the ports and options of `pdmesh serve`, the Ray resources the pools ask for, the metric names
gateway/metrics.py registers. Prometheus' own promtool checks the scrape config and every
dashboard's PromQL."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy import support
from tests.deploy.support import DEPLOY, ROOT


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: Debian's `prometheus` package has it (deploy/install.sh test installs it)"
    return path


def _k8s(name: str) -> list[dict]:
    return support.load_yaml(DEPLOY / "k8s" / name)


def _kind(docs: list[dict], kind: str) -> dict:
    return next(d for d in docs if d["kind"] == kind)


# -- everything parses ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", support.yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = support.load_yaml(path)
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("name", sorted(support.dashboards()))
def test_dashboard_is_grafana_json(name):
    board = support.dashboards()[name]
    assert board["uid"] and board["title"] and board["panels"]
    ids = [p["id"] for p in support._panels(board["panels"])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in support._panels(board["panels"]):
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        assert p["type"] == "row" or p.get("targets"), f"panel {p['title']!r} has no query"


def test_prometheus_config_is_valid_for_promtool():
    r = subprocess.run([_promtool(), "check", "config", str(support.PROMETHEUS_CONFIG)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_the_gateway_on_its_http_port():
    cfg = support.load_yaml(support.PROMETHEUS_CONFIG)[0]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == support.GATEWAY_JOB)
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"localhost:{support.serve_defaults()['--http-port']}"]


# -- dashboards against the code -------------------------------------------------------------------
def test_dashboards_show_only_metrics_the_gateway_exposes():
    exposed = support.exposed_metric_names()
    unknown = {f"{q}: {name}" for q in support.all_prometheus_queries()
               for name in support.metric_names(q.expr) - exposed}
    assert not unknown, "metrics gateway/metrics.py does not register:\n" + "\n".join(sorted(unknown))


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each expression (variables filled in as Grafana would) as a recording rule."""
    boards = support.dashboards()
    queries = support.all_prometheus_queries()
    assert queries
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"pdmesh:dashboard_query_{i}", "expr": support.fill_variables(q.expr, boards[q.dashboard])}
        for i, q in enumerate(queries)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboards_cover_what_operators_watch():
    exprs = "\n".join(q.expr for q in support.all_prometheus_queries())
    for metric in ("pdmesh_ttft_seconds_bucket", "pdmesh_tpot_seconds_bucket", "pdmesh_prefill_rejections_total",
                   "pdmesh_forwards_total", "pdmesh_kv_transfer_bytes_total", "pdmesh_actors"):
        assert metric in exprs, f"no panel shows {metric}"
    overview = support.dashboards()["pdmesh-overview.json"]
    annotations = "\n".join(q.expr for q in support.annotation_queries("pdmesh-overview.json", overview))
    assert "pdmesh_actors" in annotations, "no annotation marks actor changes"
    assert "pdmesh_controller_decisions_total" in annotations, "no annotation marks the controller's decisions"


def test_datasources_the_dashboards_use_are_provisioned():
    provisioned = support.load_yaml(DEPLOY / "observability/grafana/provisioning/datasources.yaml")[0]
    by_uid = {d["uid"]: d["type"] for d in provisioned["datasources"]}
    for name, board in support.dashboards().items():
        variables = {v["name"]: v for v in board.get("templating", {}).get("list", [])}
        for panel in support._panels(board["panels"]):
            for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
                if not ds:
                    continue
                uid = ds["uid"]
                if uid.startswith("$"):
                    var = variables[uid.strip("${}")]
                    assert var["type"] == "datasource" and var["query"] in by_uid.values(), (name, uid)
                    assert var["current"]["value"] in by_uid, f"{name}: {uid} defaults to an unprovisioned uid"
                else:
                    assert by_uid.get(uid) == ds["type"], f"{name} / {panel['title']}: no {ds} provisioned"


def test_trace_queries_name_the_services_the_code_reports():
    """The traces view filters by service.name: each one it names is one a process passes to
    mesh.tracing.configure."""
    sources = "\n".join(p.read_text() for folder in ("gateway", "mesh") for p in (ROOT / folder).rglob("*.py"))
    reported = set(re.findall(r'tracing\.configure\(\s*"([^"]+)"', sources))
    assert reported, "no process configures tracing with a service name"
    traces = json.dumps(support.dashboards()["pdmesh-traces.json"])
    named = set(re.findall(r'resource\.service\.name = \\"([^"\\]+)', traces))
    assert named and named <= reported, f"unknown services {named - reported}; the code reports {reported}"


# -- the OTel Collector, Tempo, Jaeger and compose fit together --------------------------------------
def test_collector_pipelines_use_defined_components():
    cfg = support.load_yaml(DEPLOY / "observability/otel-collector.yaml")[0]
    defined = {kind: set(cfg.get(kind, {})) for kind in ("receivers", "processors", "exporters", "connectors")}
    assert set(cfg["service"].get("extensions", [])) <= set(cfg.get("extensions", {}))
    used_connectors = set()
    for name, pipe in cfg["service"]["pipelines"].items():
        for kind in ("receivers", "exporters"):
            for c in pipe[kind]:
                assert c in defined[kind] or c in defined["connectors"], f"pipeline {name}: {kind[:-1]} {c} undefined"
                used_connectors |= {c} & defined["connectors"]
        assert set(pipe.get("processors", [])) <= defined["processors"], name
    assert used_connectors == defined["connectors"]
    assert {"traces", "metrics"} <= set(cfg["service"]["pipelines"])


def test_spans_flow_from_the_default_otlp_port_to_tempo_and_jaeger():
    collector = support.load_yaml(DEPLOY / "observability/otel-collector.yaml")[0]
    tempo = support.load_yaml(DEPLOY / "observability/tempo.yaml")[0]
    compose = support.load_yaml(DEPLOY / "compose.yaml")[0]
    # the OTLP gRPC port an OTEL_EXPORTER_OTLP_ENDPOINT of http://localhost:4317 reaches
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    port = lambda endpoint: endpoint.rsplit(":", 1)[1]  # noqa: E731
    tempo_in = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert port(collector["exporters"]["otlp/tempo"]["endpoint"]) == port(tempo_in)
    jaeger_in = compose["services"]["jaeger"]["environment"]["COLLECTOR_OTLP_GRPC_HOST_PORT"]
    assert port(collector["exporters"]["otlp/jaeger"]["endpoint"]) == port(jaeger_in)
    # Prometheus scrapes the collector's exporter; Grafana reads Tempo where it serves
    prometheus = support.load_yaml(support.PROMETHEUS_CONFIG)[0]
    collector_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "otel-collector")
    assert port(collector_job["static_configs"][0]["targets"][0]) == port(collector["exporters"]["prometheus"]["endpoint"])
    datasources = support.load_yaml(DEPLOY / "observability/grafana/provisioning/datasources.yaml")[0]
    tempo_url = next(d["url"] for d in datasources["datasources"] if d["type"] == "tempo")
    assert port(tempo_url) == str(tempo["server"]["http_listen_port"])


def test_compose_mounts_files_that_exist():
    compose = support.load_yaml(DEPLOY / "compose.yaml")[0]
    named_volumes = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        assert service.get("network_mode") == "host", f"{name}: the stack's ports assume the host network"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in named_volumes or (DEPLOY / source).exists(), f"{name}: {source} is missing"
    provider = support.load_yaml(DEPLOY / "observability/grafana/provisioning/dashboards.yaml")[0]
    dashboards_in = provider["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./observability/grafana/dashboards"] == dashboards_in


# -- images -------------------------------------------------------------------------------------------
def _images_named() -> dict[str, list[str]]:
    """{image: [where]} for every image the manifests and the launcher run."""
    found: dict[str, list[str]] = {}

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "image" and isinstance(v, str):
                    found.setdefault(v, []).append(where)
                else:
                    walk(v, where)
        elif isinstance(node, list):
            for v in node:
                walk(v, where)

    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        walk(support.load_yaml(path), path.name)
    return found


def test_manifests_run_the_images_build_sh_makes():
    images = _images_named()
    assert images
    version = support.pdmesh_version()
    build = (DEPLOY / "docker/build.sh").read_text()
    for image, where in images.items():
        repo, _, tag = image.partition(":")
        name = repo.removeprefix("pdmesh/")
        assert repo == f"pdmesh/{name}" and tag == version, f"{image} ({where}): expected pdmesh/<name>:{version}"
        assert (DEPLOY / f"docker/{name}.Dockerfile").exists(), f"{image} ({where}): no deploy/docker/{name}.Dockerfile"
        assert name in build, f"build.sh does not build {name}"
    assert {"pdmesh/gateway", "pdmesh/worker-cuda", "pdmesh/worker-ascend"} <= {i.split(":")[0] for i in images}


def _arg_default(text: str, name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)", text, re.M).group(1)


def test_every_image_and_the_cluster_share_python_ray_and_torch():
    """Ray refuses nodes of another Ray or Python version: the three images, build.sh and the
    RayCluster must agree."""
    dockerfiles = {p.name: p.read_text() for p in (DEPLOY / "docker").glob("*.Dockerfile")}
    build = (DEPLOY / "docker/build.sh").read_text()
    ray_version = re.search(r"RAY_VERSION:-([\d.]+)", build).group(1)
    python_version = re.search(r"PYTHON_VERSION:-([\d.]+)", build).group(1)
    torch_version = re.search(r"PDMESH_TORCH_VERSION:-([\d.]+)", build).group(1)
    install = (DEPLOY / "install.sh").read_text()
    assert re.search(r"PDMESH_TORCH_VERSION:-([\d.]+)", install).group(1) == torch_version
    for name, text in dockerfiles.items():
        assert _arg_default(text, "RAY_VERSION") == ray_version, name
        assert _arg_default(text, "PDMESH_TORCH_VERSION") == torch_version, name
        assert "deploy/install.sh" in text, f"{name} installs pdmesh some other way than deploy/install.sh"
        if "CANN_IMAGE" in text:
            assert _arg_default(text, "CANN_IMAGE").endswith(f"-py{python_version}"), name
        else:
            assert _arg_default(text, "PYTHON_VERSION") == python_version, name
    cluster = _kind(_k8s("raycluster.yaml"), "RayCluster")
    assert cluster["spec"]["rayVersion"] == ray_version


# -- the gateway: ports, options, keys ------------------------------------------------------------
def _gateway() -> tuple[dict, dict, dict]:
    docs = _k8s("gateway.yaml")
    deployment = _kind(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return deployment, container, _kind(docs, "Service")


def test_gateway_runs_pdmesh_serve_with_options_it_has():
    defaults = support.serve_defaults()
    _, container, _ = _gateway()
    options = support.serve_invocation(container["args"][0])
    assert set(options) <= set(defaults), f"not options of pdmesh serve: {set(options) - set(defaults)}"
    for flag in ("--http-port", "--grpc-port"):
        assert int(options[flag]) == defaults[flag], f"{flag}: keep the default, which the other files use"
    assert options["--host"] == "0.0.0.0"
    assert options["--ray-address"] == "auto"  # it joined the cluster as a node just before


def test_gateway_ports_probes_and_service_match_serve():
    defaults = support.serve_defaults()
    deployment, container, service = _gateway()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": defaults["--http-port"], "grpc": defaults["--grpc-port"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == defaults["--http-port"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_gateway_mounts_what_its_options_name():
    """Each file option points into a volume the pod mounts: the scenarios ConfigMap that
    kustomize generates, and the keys Secret."""
    deployment, container, _ = _gateway()
    options = support.serve_invocation(container["args"][0])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}

    def volume_of(path):
        mount = max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len)
        return volumes[mounts[mount]]

    kustomization = _k8s("kustomization.yaml")[0]
    config_map = kustomization["configMapGenerator"][0]
    assert volume_of(options["--config"])["configMap"]["name"] == config_map["name"]
    assert config_map["files"] == ["scenarios.yaml"]
    secret = _kind(_k8s("secret.example.yaml"), "Secret")
    for flag in ("--api-key-file", "--admin-key-file"):
        volume = volume_of(options[flag])
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert options[flag].rsplit("/", 1)[1] in secret["stringData"]


def test_gateway_image_serves_on_the_default_ports():
    defaults = support.serve_defaults()
    text = (DEPLOY / "docker/gateway.Dockerfile").read_text()
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}
    assert exposed == {defaults["--http-port"], defaults["--grpc-port"]}
    cmd = json.loads(re.search(r"^CMD (\[.+\])$", text, re.M).group(1))
    options = support.serve_invocation(" ".join(cmd))
    assert set(options) <= set(defaults)
    assert int(options["--http-port"]) == defaults["--http-port"]


# -- the Ray cluster: resources the pools ask for --------------------------------------------------
def _groups() -> dict[str, dict]:
    cluster = _kind(_k8s("raycluster.yaml"), "RayCluster")
    return {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}


def _limits(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def _ray_resources(group: dict) -> dict:
    """rayStartParams' resources: a JSON object that KubeRay passes quoted to `ray start`."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def test_worker_groups_offer_the_resources_the_pools_ask_for():
    from mesh.pool import Hardware

    groups = _groups()
    gpu_ask = Hardware(num_gpus=1).options()
    assert gpu_ask["num_gpus"] == 1
    gpu = [g for g in groups.values() if "nvidia.com/gpu" in _limits(g)]
    assert gpu and all(g["template"]["spec"]["containers"][0]["image"].startswith("pdmesh/worker-cuda:") for g in gpu)
    npu_ask = Hardware(npus=1).options()["resources"]  # the custom resource NPU actors are placed by
    npu = [g for g in groups.values() if "huawei.com/Ascend910" in _limits(g)]
    assert npu
    for g in npu:
        assert g["template"]["spec"]["containers"][0]["image"].startswith("pdmesh/worker-ascend:")
        offered = _ray_resources(g)
        assert set(npu_ask) <= set(offered), f"{g['groupName']} advertises {offered}, the pools ask for {npu_ask}"
        assert offered[next(iter(npu_ask))] == _limits(g)["huawei.com/Ascend910"]
    head = _kind(_k8s("raycluster.yaml"), "RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "actors belong on the workers"


def test_scenarios_config_loads_and_each_role_fits_a_worker_group():
    from gateway.config import load
    from mesh.pool import Hardware

    cfg = load(DEPLOY / "k8s/scenarios.yaml")
    groups = _groups()
    npu_resource = next(iter(Hardware(npus=1).options()["resources"]))
    for spec in cfg.scenarios:
        assert spec.model.startswith("/models/"), "the models volume is mounted at /models"
        for role, hw in spec.hardware.items():
            fits = [name for name, g in groups.items()
                    if (not hw.num_gpus or _limits(g).get("nvidia.com/gpu", 0) >= hw.num_gpus)
                    and (not hw.npus or _ray_resources(g).get(npu_resource, 0) >= hw.npus)
                    and float(str(_limits(g)["cpu"])) >= hw.num_cpus]
            assert fits, f"scenario {spec.name} {role}: no worker group offers {hw}"


def test_kustomization_lists_every_manifest_it_can_apply():
    kustomization = _k8s("kustomization.yaml")[0]
    # examples and optional CRD-dependent manifests are applied by hand (their comments say how)
    optional = {"secret.example.yaml", "podmonitor.yaml", "kustomization.yaml", "scenarios.yaml"}
    manifests = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - optional
    assert set(kustomization["resources"]) == manifests
    claims = {d["metadata"]["name"] for d in _k8s("models-pvc.yaml")}
    used = set(re.findall(r"claimName: (\S+?)[,}\s]", "".join((DEPLOY / "k8s" / m).read_text() for m in manifests)))
    assert used and used <= claims


def test_ray_launcher_starts_a_head_without_actors():
    cfg = support.load_yaml(DEPLOY / "ray/cluster.yaml")[0]
    assert cfg["provider"]["type"] == "local"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head and "--num-cpus=0" in head
    assert all("deploy/install.sh" in c for c in cfg["setup_commands"][:1])


# -- the control plane: who may reach Ray and the KV ports ---------------------------------------
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _ray_pod_templates() -> dict[str, dict]:
    spec = _kind(_k8s("raycluster.yaml"), "RayCluster")["spec"]
    return {"head": spec["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}


def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    return selector["matchLabels"].items() <= labels.items()


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_ray_dashboard_listens_on_loopback_or_not_at_all():
    head = _kind(_k8s("raycluster.yaml"), "RayCluster")["spec"]["headGroupSpec"]
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
    secrets = {d["metadata"]["name"]: d for d in _k8s("secret.example.yaml") if d["kind"] == "Secret"}
    _, gateway, _ = _gateway()
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
    policies = [d for d in _k8s("networkpolicy.yaml") if d["kind"] == "NetworkPolicy"]
    deployment, container, service = _gateway()
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
    assert _arg_default(text, "UCX_VERSION") == wheel
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
    groups = _groups()
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
