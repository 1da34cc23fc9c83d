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
    for metric in ("pdmesh:time_to_first_token_seconds_bucket", "pdmesh:request_time_per_output_token_seconds_bucket",
                   "pdmesh:prefill_rejections_total", "pdmesh:forwards_total", "pdmesh:kv_transfer_bytes_total",
                   "pdmesh:actors", "pdmesh:prompt_tokens_total", "pdmesh:generation_tokens_total",
                   "pdmesh:num_requests_running", "pdmesh:num_requests_waiting", "pdmesh:kv_cache_usage_perc",
                   "pdmesh:prefix_cache_hits_total", "pdmesh:prefix_cache_queries_total"):
        assert metric in exprs, f"no panel shows {metric}"
    overview = support.dashboards()["pdmesh-overview.json"]
    annotations = "\n".join(q.expr for q in support.annotation_queries("pdmesh-overview.json", overview))
    assert "pdmesh:actors" in annotations, "no annotation marks actor changes"
    assert "pdmesh:controller_decisions_total" in annotations, "no annotation marks the controller's decisions"


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


def test_dashboards_pick_their_datasources_through_variables():
    """A Grafana whose Prometheus or Tempo has another uid than ours can still use the
    dashboards: every panel names its data source by a template variable, never by uid."""
    for name, board in support.dashboards().items():
        for panel in support._panels(board["panels"]):
            for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
                assert not ds or ds["uid"].startswith("$"), f"{name} / {panel['title']}: hard-coded uid {ds['uid']}"


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
        assert support.arg_default(text, "RAY_VERSION") == ray_version, name
        assert support.arg_default(text, "PDMESH_TORCH_VERSION") == torch_version, name
        assert "deploy/install.sh" in text, f"{name} installs pdmesh some other way than deploy/install.sh"
        if "CANN_IMAGE" in text:
            assert support.arg_default(text, "CANN_IMAGE").endswith(f"-py{python_version}"), name
        else:
            assert support.arg_default(text, "PYTHON_VERSION") == python_version, name
    cluster = support.kind(support.k8s("raycluster.yaml"), "RayCluster")
    assert cluster["spec"]["rayVersion"] == ray_version


# -- the gateway: ports, options, keys ------------------------------------------------------------


def test_gateway_runs_pdmesh_serve_with_options_it_has():
    defaults = support.serve_defaults()
    _, container, _ = support.gateway()
    options = support.serve_invocation(container["args"][0])
    assert set(options) <= set(defaults), f"not options of pdmesh serve: {set(options) - set(defaults)}"
    for flag in ("--http-port", "--grpc-port"):
        assert int(options[flag]) == defaults[flag], f"{flag}: keep the default, which the other files use"
    assert options["--host"] == "0.0.0.0"
    assert options["--ray-address"] == "auto"  # it joined the cluster as a node just before


def test_gateway_ports_probes_and_service_match_serve():
    defaults = support.serve_defaults()
    deployment, container, service = support.gateway()
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
    deployment, container, _ = support.gateway()
    options = support.serve_invocation(container["args"][0])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}

    def volume_of(path):
        mount = max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len)
        return volumes[mounts[mount]]

    kustomization = support.k8s("kustomization.yaml")[0]
    config_map = kustomization["configMapGenerator"][0]
    assert volume_of(options["--config"])["configMap"]["name"] == config_map["name"]
    assert config_map["files"] == ["scenarios.yaml"]
    secret = support.kind(support.k8s("secret.example.yaml"), "Secret")
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


def _limits(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def _ray_resources(group: dict) -> dict:
    """rayStartParams' resources: a JSON object that KubeRay passes quoted to `ray start`."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def test_worker_groups_offer_the_resources_the_pools_ask_for():
    from mesh.pool import Hardware

    groups = support.groups()
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
    head = support.kind(support.k8s("raycluster.yaml"), "RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "actors belong on the workers"


def test_scenarios_config_loads_and_each_role_fits_a_worker_group():
    from gateway.config import load
    from mesh.pool import Hardware

    cfg = load(DEPLOY / "k8s/scenarios.yaml")
    groups = support.groups()
    npu_resource = next(iter(Hardware(npus=1).options()["resources"]))
    for spec in cfg.scenarios:
        assert spec.model.startswith("/models/"), "the models volume is mounted at /models"
        for role, hw in spec.hardware.items():
            fits = [name for name, g in groups.items()
                    if (not hw.num_gpus or _limits(g).get("nvidia.com/gpu", 0) >= hw.num_gpus)
                    and (not hw.npus or _ray_resources(g).get(npu_resource, 0) >= hw.npus)
                    and float(str(_limits(g)["cpu"])) >= hw.num_cpus]
            assert fits, f"scenario {spec.name} {role}: no worker group offers {hw}"


def test_the_gateways_autoscaler_has_kuberays_in_tree_autoscaler_to_ask():
    """The gateway's scale steps ask Ray for resources (gateway.scaling); on Kubernetes KubeRay's
    autoscaler acts on the request, reaches the GCS with the cluster's token, and each group that
    actors land on may grow beyond its replicas."""
    from gateway.config import load

    spec = support.kind(support.k8s("raycluster.yaml"), "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    env = {e["name"]: e for e in spec["autoscalerOptions"]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "pdmesh-ray-token"
    assert all(g["maxReplicas"] > g["replicas"] for g in support.groups().values() if g["replicas"])
    assert load(DEPLOY / "k8s/scenarios.yaml").controller.autoscale is not None


def test_kustomization_lists_every_manifest_it_can_apply():
    kustomization = support.k8s("kustomization.yaml")[0]
    # examples and optional CRD-dependent manifests are applied by hand (their comments say how)
    optional = {"secret.example.yaml", "podmonitor.yaml", "kustomization.yaml", "scenarios.yaml"}
    manifests = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - optional
    assert set(kustomization["resources"]) == manifests
    claims = {d["metadata"]["name"] for d in support.k8s("models-pvc.yaml")}
    used = set(re.findall(r"claimName: (\S+?)[,}\s]", "".join((DEPLOY / "k8s" / m).read_text() for m in manifests)))
    assert used and used <= claims


def test_ray_launcher_starts_a_head_without_actors():
    cfg = support.load_yaml(DEPLOY / "ray/cluster.yaml")[0]
    assert cfg["provider"]["type"] == "local"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head and "--num-cpus=0" in head
    assert all("deploy/install.sh" in c for c in cfg["setup_commands"][:1])
