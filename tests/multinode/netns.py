"""A Ray cluster whose nodes are Linux network namespaces: a real network between them.

Each node is a namespace with one veth link to a bridge that lives in a namespace of
its own, on a private subnet that exists only inside these namespaces: nothing is
added to the host's own namespace, no traffic leaves them, and loopback in one node
does not reach another. A Ray node runs in each (the first is the head). Taking a
node's link down cuts it off as a dead switch port would.

Clean-up kills every process inside the namespaces and deletes them, also when a
test fails and at interpreter exit.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

RAY_PORT = 6380  # inside the head's own namespace: no other process can hold it


def unavailable() -> str:
    """Why namespaces cannot be made here ("" when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    name = f"pdmt-probe-{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


@dataclass(frozen=True)
class Node:
    name: str  # role in the test: head, prefill, decode
    netns: str
    address: str
    veth: str  # its end of the link; the bridge's end is veth + "b"
    resources: dict = field(default_factory=dict)


class NamespaceCluster:
    def __init__(self, roles: dict[str, dict], cpus: dict[str, int] | None = None):
        """roles: node name -> its custom Ray resources; the first is the head."""
        tag = f"{os.getpid() % 100000}"
        self.prefix = f"pdmt{tag}"
        subnet = 10 + os.getpid() % 200  # one /24 per concurrent run: 10.231.<subnet>.0/24
        self.bridge = f"{self.prefix}-br"
        self.nodes = {name: Node(name, f"{self.prefix}-{name}", f"10.231.{subnet}.{i + 1}", f"{self.prefix}v{i}", res)
                      for i, (name, res) in enumerate(roles.items())}
        self.cpus = cpus or {}
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "UCX_WARN_UNUSED_ENV_VARS": "n"}
        self._made: list[str] = []
        atexit.register(self.close)

    @property
    def head(self) -> Node:
        return next(iter(self.nodes.values()))

    @property
    def ray_address(self) -> str:
        return f"{self.head.address}:{RAY_PORT}"

    # -- set-up -----------------------------------------------------------------------------
    def start(self) -> "NamespaceCluster":
        try:
            self._ns(self.bridge)
            _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge, "link", "set", "br0", "up")
            for node in self.nodes.values():
                self._ns(node.netns)
                inner, outer = node.veth, f"{node.veth}b"
                _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
                _ip("link", "set", inner, "netns", node.netns)
                _ip("link", "set", outer, "netns", self.bridge)
                _ip("-n", self.bridge, "link", "set", outer, "master", "br0")
                _ip("-n", self.bridge, "link", "set", outer, "up")
                _ip("-n", node.netns, "link", "set", "lo", "up")
                _ip("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", inner)
                _ip("-n", node.netns, "link", "set", inner, "up")
            for node in self.nodes.values():
                self._ray_start(node)
            self.wait_nodes(len(self.nodes))
        except BaseException:
            self.close()
            raise
        return self

    def _ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _ray_start(self, node: Node) -> None:
        head = node is self.head
        args = ["ray", "start", "--node-ip-address", node.address, "--temp-dir", f"{self.tmp}/{node.name}",
                "--num-cpus", str(self.cpus.get(node.name, 0 if head else 2)), "--disable-usage-stats",
                "--resources", json.dumps(node.resources)]
        args += (["--head", "--port", str(RAY_PORT), "--include-dashboard", "false"] if head
                 else ["--address", self.ray_address])
        proc = self.run(node, args, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"ray start on {node.name} failed:\n{proc.stdout}\n{proc.stderr}")

    # -- use --------------------------------------------------------------------------------
    def command(self, node: Node, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", node.netns, *argv]

    def run(self, node: Node, argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(node, argv), capture_output=True, text=True, timeout=timeout,
                              env=kw.pop("env", self.env), **kw)

    def popen(self, node: Node, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(node, argv), env=kw.pop("env", self.env), **kw)

    def python(self, node: Node, code: str, timeout: float = 180) -> dict:
        """Runs code in the node's namespace; its last stdout line is JSON."""
        proc = self.run(node, ["python3", "-c", code], timeout=timeout)
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

    def link(self, node: Node, up: bool) -> None:
        """Plugs a node's cable in or out at the bridge."""
        _ip("-n", self.bridge, "link", "set", f"{node.veth}b", "up" if up else "down")

    # -- clean-up ---------------------------------------------------------------------------
    def close(self) -> None:
        for name in reversed(self._made):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
        for name in reversed(self._made):
            for _ in range(20):  # a killed process may hold the namespace for a moment
                if subprocess.run(["ip", "netns", "del", name], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        self._made.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
