"""`pdmesh doctor`: what this host gives pdmesh, and what to fix before serving on it.

It starts nothing: torch's build and devices, what UCX itself reports it can use
(and whether RDMA NICs sit unused because this UCX has no verbs), the Ray cluster
it can reach, the address actors will advertise, and a config check. Each finding
is ok, a warning (serving works, maybe slower or only on one host) or an error
(serving this way fails); errors make the exit code 1.
"""
from __future__ import annotations

import json
import os
import platform
import socket
from dataclasses import asdict, dataclass

import click

LEVELS = ("ok", "info", "warn", "error")


@dataclass(frozen=True)
class Finding:
    area: str  # host, torch, ucx, ray, network, config
    name: str
    value: str
    level: str = "ok"
    hint: str = ""  # what to do about a warning or an error

    def __post_init__(self) -> None:
        assert self.level in LEVELS, self.level


def host() -> list[Finding]:
    from mesh import cpu_has_fast_half

    fast = cpu_has_fast_half()
    return [Finding("host", "python", platform.python_version()),
            Finding("host", "cpus", str(os.cpu_count())),
            Finding("host", "bf16 matrix units", "yes" if fast else "no", "ok" if fast else "info",
                    "" if fast else "dtype=auto computes in fp32 on this CPU (bf16 would be slower)")]


def torch_devices() -> list[Finding]:
    import torch

    from mesh import npu_available

    found = [Finding("torch", "version", torch.__version__),
             Finding("torch", "build", f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only")]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        found.append(Finding("torch", "cuda devices", f"{len(names)}: {', '.join(names)}"))
    else:
        found.append(Finding("torch", "cuda devices", "none", "info"))
    if npu_available():
        found.append(Finding("torch", "npu devices", str(torch.npu.device_count())))
    else:
        found.append(Finding("torch", "npu devices", "none (torch_npu with CANN not importable, or no device)", "info"))
    return found


def ucx(cuda_devices: bool) -> list[Finding]:
    from transport.ucx_report import report

    r = report()
    if r.error:
        return [Finding("ucx", "library", r.error, "error",
                        "the ucx backend cannot run: install ucxx-cu12, or serve with transport.backend: tcp")]
    found = [Finding("ucx", "version", r.version),
             Finding("ucx", "transports", ", ".join(r.transports)),
             Finding("ucx", "rdma nics", ", ".join(r.rdma_nics) or "none", "ok" if r.rdma_nics else "info")]
    if r.rdma_unused:
        found.append(Finding("ucx", "rdma", "NICs present, but this UCX has no InfiniBand/RoCE transports", "warn",
                             "KV moves over TCP: install rdma-core and a UCX built with verbs and rdmacm, and set "
                             "RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true so ucxx loads it (deploy/README.md)"))
    elif r.has_ib:
        found.append(Finding("ucx", "rdma", "InfiniBand/RoCE transports available"))
    if cuda_devices and not r.has_cuda:
        found.append(Finding("ucx", "cuda", "CUDA devices present, but UCX reports no CUDA transports", "warn",
                             "GPU KV is staged through host memory: use a UCX built with CUDA support"))
    return found


def ray_cluster(address: str | None) -> list[Finding]:
    import ray

    from mesh import connect, disconnect

    found = [Finding("ray", "version", ray.__version__)]
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        if address != "auto":  # Ray itself retries an unreachable address for minutes
            host, _, port = address.rpartition(":")
            socket.create_connection((host, int(port)), timeout=3).close()
        connect(address, namespace="pdmesh-doctor")
    except Exception as e:  # no cluster there: ConnectionError, or Ray's own errors
        found.append(Finding("ray", "cluster", f"none reachable at {address!r} ({type(e).__name__})", "info",
                             "`pdmesh serve` starts an embedded one; give --ray-address host:port to check another"))
        return found
    try:
        found.append(Finding("ray", "cluster", ray.get_runtime_context().gcs_address))
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            shown = ", ".join(f"{k}={v:g}" for k, v in sorted(res.items())
                              if k in ("CPU", "GPU", "NPU", "memory") or not k.startswith("node:"))
            found.append(Finding("ray", f"node {node['NodeManagerAddress']}", shown))
    finally:
        disconnect()
    return found


def network() -> list[Finding]:
    import ray

    from transport.address import ENV_HOST, ENV_INTERFACE, AddressError, interface_of, resolve_host

    node_ip = ray.util.get_node_ip_address()
    found = [Finding("network", "node address", node_ip)]
    try:
        # An actor on this host resolves its receiver's address the same way (transport.address).
        advertised = resolve_host("", "", node_ip)
    except AddressError as e:
        return found + [Finding("network", "KV receivers advertise", str(e), "error",
                                f"fix {ENV_HOST} / {ENV_INTERFACE} in this node's environment")]
    why = (f"from {ENV_HOST}" if os.environ.get(ENV_HOST) else
           f"from {ENV_INTERFACE}" if os.environ.get(ENV_INTERFACE) else "the node's address")
    nic = interface_of(advertised)
    value = f"{advertised} ({why}; NIC {nic or 'not on this host'})"
    if advertised.startswith("127."):
        return found + [Finding("network", "KV receivers advertise", value, "warn",
                                "loopback: prefill and decode actors must share one host; on a cluster, "
                                f"start Ray with --node-ip-address or set {ENV_HOST} / {ENV_INTERFACE}")]
    if nic is None:
        return found + [Finding("network", "KV receivers advertise", value, "error",
                                "no NIC of this host holds that address: receivers cannot listen on it")]
    return found + [Finding("network", "KV receivers advertise", value)]


def config_check(path: str) -> list[Finding]:
    from gateway import config
    from scenarios.spec import SpecError

    try:
        cfg = config.load(path)
    except (SpecError, ValueError, OSError) as e:
        return [Finding("config", path, str(e), "error", "fix the fields named above")]
    names = ", ".join(s.name for s in cfg.scenarios)
    return [Finding("config", path, f"valid: scenarios {names}")]


def run(ray_address: str | None, config_path: str | None) -> list[Finding]:
    import torch

    findings = host() + torch_devices() + ucx(torch.cuda.is_available()) + ray_cluster(ray_address) + network()
    if config_path:
        findings += config_check(config_path)
    return findings


@click.command("doctor")
@click.option("--ray-address", default=None, help="a Ray cluster to check (default: RAY_ADDRESS, else 'auto')")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="a serve config to validate")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def doctor(ray_address, config_path, output):
    """What this host gives pdmesh: devices, UCX transports, Ray, addresses, config."""
    findings = run(ray_address, config_path)
    failed = any(f.level == "error" for f in findings)
    if output == "json":
        click.echo(json.dumps({"ok": not failed, "findings": [asdict(f) for f in findings]}, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(show_edge=False)
        for col in ("area", "check", "value", ""):
            table.add_column(col, overflow="fold")
        marks = {"ok": "ok", "info": "", "warn": "[yellow]warn[/]", "error": "[red]error[/]"}
        for f in findings:
            table.add_row(f.area, f.name, f.value + (f"\n[dim]{f.hint}[/]" if f.hint else ""), marks[f.level])
        Console().print(table)
    raise SystemExit(1 if failed else 0)
