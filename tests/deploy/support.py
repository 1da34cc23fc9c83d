"""What the deploy tests read: the files under deploy/, the PromQL of the Grafana dashboards
with their variables filled in as Grafana would, and the facts the code states (metric names,
`pdmesh serve`'s options and default ports, the Ray resource the pools ask NPUs by)."""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "observability" / "grafana" / "dashboards"
PROMETHEUS_CONFIG = DEPLOY / "observability" / "prometheus.yml"
GATEWAY_JOB = "pdmesh-gateway"  # the scrape job of the gateway in prometheus.yml


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_yaml(path: Path) -> list:
    """Every document of a YAML file (manifests hold several)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def pdmesh_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# -- Grafana dashboards ------------------------------------------------------------------------
@dataclass(frozen=True)
class Query:
    dashboard: str
    title: str  # the panel's title, or "annotation: <name>"
    expr: str  # as written, with Grafana's variables

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.title}: {self.expr}"


def _panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # rows hold their panels when collapsed


def _is_prometheus(datasource: dict | None, board: dict) -> bool:
    if not datasource:
        return False
    if datasource.get("type") == "prometheus":
        return True
    var = (datasource.get("uid") or "").strip("${}")
    return any(v["name"] == var and v["type"] == "datasource" and v.get("query") == "prometheus"
               for v in board.get("templating", {}).get("list", []))


def panel_queries(name: str, board: dict) -> list[Query]:
    """Every PromQL expression of every panel of a dashboard."""
    out = []
    for panel in _panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if _is_prometheus(target.get("datasource") or panel.get("datasource"), board) and target.get("expr"):
                out.append(Query(name, panel["title"], target["expr"]))
    return out


def annotation_queries(name: str, board: dict) -> list[Query]:
    return [Query(name, f"annotation: {a['name']}", a["expr"])
            for a in board.get("annotations", {}).get("list", [])
            if _is_prometheus(a.get("datasource"), board) and a.get("expr")]


def all_prometheus_queries() -> list[Query]:
    return [q for name, board in dashboards().items()
            for q in panel_queries(name, board) + annotation_queries(name, board)]


def fill_variables(expr: str, board: dict, rate_interval: str = "1m", interval: str = "15s") -> str:
    """The expression as Grafana sends it: its built-in intervals, each custom variable at its
    current value, each multi-value query variable at "All" (its allValue regex)."""
    values = {"__rate_interval": rate_interval, "__interval": interval, "__range": "1h"}
    for var in board.get("templating", {}).get("list", []):
        if var["type"] == "custom":
            values[var["name"]] = var["current"]["value"]
        elif var["type"] == "query":
            values[var["name"]] = var.get("allValue") or ".*"
    # longest names first, so that $__rate_interval is not read as $__rate followed by text
    for key in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + key + "}", values[key]).replace("$" + key, values[key])
    assert "$" not in expr, f"a variable the tests do not know is left in: {expr}"
    return expr


METRIC_NAME = re.compile(r"\bpdmesh[:_][a-z0-9_:]+")  # pdmesh_: an old name, which the exporter lacks


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


# -- what the code says ------------------------------------------------------------------------
def exposed_metric_names() -> set[str]:
    """The sample names the gateway's /metrics can carry, from gateway.metrics' registry."""
    from gateway.metrics import Metrics
    from mesh.api import ActorReport, ActorState, Role

    metrics = Metrics(lambda: {"s": [ActorReport("a", "s", Role.PREFILL, ActorState.SERVING)]})
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                "summary": ("", "_sum", "_count")}
    return {family.name + s for family in metrics.registry.collect() for s in suffixes.get(family.type, ("",))}


def serve_command() -> click.Command:
    """`pdmesh serve`, as the console script finds it; skipped, saying why, while it does not exist."""
    from gateway.cli import main

    try:
        command = main.get_command(click.Context(main), "serve")
    except ImportError as e:
        pytest.skip(f"`pdmesh serve` cannot be imported yet (gateway, issue 5): {e}")
    if command is None:
        pytest.skip("`pdmesh serve` does not exist yet (gateway, issue 5)")
    return command


def serve_defaults() -> dict[str, object]:
    """{"--http-port": 8000, ...}: each option of `pdmesh serve` by its long flag, with its default."""
    return {flag: p.default for p in serve_command().params if isinstance(p, click.Option)
            for flag in p.opts if flag.startswith("--")}


def serve_invocation(command_line: str) -> dict[str, str | None]:
    """The options of the `pdmesh serve` in a shell command line: {"--http-port": "8000", ...}."""
    words = shlex.split(command_line.replace("\\\n", " "))
    start = next(i for i in range(len(words) - 1) if words[i:i + 2] == ["pdmesh", "serve"]) + 2
    options: dict[str, str | None] = {}
    i = start
    while i < len(words) and words[i].startswith("--"):
        flag, _, value = words[i].partition("=")
        if value or i + 1 >= len(words) or words[i + 1].startswith("--"):
            options[flag] = value or None
            i += 1
        else:
            options[flag] = words[i + 1]
            i += 2
    return options


# -- the manifests, read ------------------------------------------------------------------------
def k8s(name: str) -> list[dict]:
    """The documents of one manifest under deploy/k8s."""
    return load_yaml(DEPLOY / "k8s" / name)


def kind(docs: list[dict], kind: str) -> dict:
    return next(d for d in docs if d["kind"] == kind)


def arg_default(text: str, name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)", text, re.M).group(1)


def gateway() -> tuple[dict, dict, dict]:
    docs = k8s("gateway.yaml")
    deployment = kind(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return deployment, container, kind(docs, "Service")


def groups() -> dict[str, dict]:
    cluster = kind(k8s("raycluster.yaml"), "RayCluster")
    return {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
