"""A Ray cluster whose nodes are hosts of a NamespaceNet (transport/netns.py): a real
network between them. A Ray node runs in each (the first is the head), with token
authentication as a real cluster has it: every `ray start` and every driver gets the
cluster's token in its environment. Clean-up is the NamespaceNet's, plus Ray's files.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from transport.netns import Host, NamespaceNet, unavailable

__all__ = ["NamespaceCluster", "RAY_PORT", "unavailable"]

RAY_PORT = 6380  # inside the head's own namespace: no other process can hold it
ROOT = Path(__file__).resolve().parents[2]  # this checkout: what every node's workers import


class NamespaceCluster(NamespaceNet):
    def __init__(self, roles: dict[str, dict], cpus: dict[str, int] | None = None, env: dict | None = None):
        """roles: node name -> its custom Ray resources; the first is the head. env: for
        every node's Ray (and so its actors) and every command run here."""
        super().__init__(list(roles))
        self.resources = roles
        self.cpus = cpus or {}
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0", "UCX_WARN_UNUSED_ENV_VARS": "n",
                    "PYTHONPATH": str(ROOT), **(env or {})}
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.env.pop("RAY_ADDRESS", None)
        if "UCX_NET_DEVICES" not in (env or {}):
            # a pin this test process gave its own loopback receivers (transport.address.for_node)
            # would keep the nodes' UCX on their loopback, off the links between them
            self.env.pop("UCX_NET_DEVICES", None)

    @property
    def nodes(self) -> dict[str, Host]:
        return self.hosts

    @property
    def head(self) -> Host:
        return next(iter(self.hosts.values()))

    @property
    def ray_address(self) -> str:
        return f"{self.head.address}:{RAY_PORT}"

    def start(self) -> "NamespaceCluster":
        super().start()
        try:
            for node in self.hosts.values():
                self.start_ray(node)
            self.wait_nodes(len(self.hosts))
        except BaseException:
            self.close()
            raise
        return self

    def start_ray(self, node: Host) -> None:
        head = node is self.head
        args = ["ray", "start", "--node-ip-address", node.address, "--temp-dir", f"{self.tmp}/{node.name}",
                "--num-cpus", str(self.cpus.get(node.name, 0 if head else 2)), "--disable-usage-stats",
                "--resources", json.dumps(self.resources[node.name])]
        args += (["--head", "--port", str(RAY_PORT), "--include-dashboard", "false"] if head
                 else ["--address", self.ray_address])
        proc = self.run(node, args, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"ray start on {node.name} failed:\n{proc.stdout}\n{proc.stderr}")

    def run(self, node: Host, argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(node, argv), capture_output=True, text=True, timeout=timeout,
                              env=kw.pop("env", self.env), cwd=ROOT, **kw)

    def popen(self, node: Host, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(node, argv), env=kw.pop("env", self.env), cwd=ROOT, **kw)

    def python(self, node: Host, code: str, timeout: float = 180, args: tuple[str, ...] = ()) -> object:
        """Runs code in the node's namespace; its last stdout line is JSON."""
        proc = self.run(node, ["python3", "-c", code, *args], timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"on {node.name}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> set[str]:
        code = (f"import json, ray; ray.init(address={self.ray_address!r}, log_to_driver=False, "
                f"configure_logging=False); print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() "
                f"if n['Alive']]))")
        return set(self.python(self.head, code, timeout=60))

    def wait_nodes(self, n: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(alive := self.alive_nodes()) != n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(alive)} of {n} Ray nodes alive after {timeout_s} s: {alive}")
            time.sleep(1)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.tmp, ignore_errors=True)
