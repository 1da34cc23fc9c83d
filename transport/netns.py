"""Hosts made of Linux network namespaces: a real network on one machine, for the
multi-node tests and `pdmesh bench transport --across-namespaces`.

Each host is a namespace with one veth link to a bridge that lives in a namespace of
its own, on a private /24 that exists only inside these namespaces: nothing is added
to the machine's own namespace, no traffic leaves them, and loopback in one host does
not reach another. Taking a host's link down cuts it off as a dead switch port would.
Needs root and iproute2 (`unavailable` says why not).

Clean-up kills every process inside the namespaces and deletes them, also when the
caller fails and at interpreter exit. Namespaces share the machine's filesystem,
/dev/shm included: UCX's shared-memory transports still reach across them, so only
UCX_TLS=tcp proves the network path.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import time
from dataclasses import dataclass


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
class Host:
    name: str  # its role: head, prefill, decode, sender, ...
    netns: str
    address: str
    veth: str  # its end of the link (the NIC inside); the bridge's end is veth + "b"


class NamespaceNet:
    def __init__(self, names: list[str], tag: str = "pdmt"):
        """One host per name, at .1, .2, ... of a /24 picked per process."""
        self.prefix = f"{tag}{os.getpid() % 100000}"
        subnet = 10 + os.getpid() % 200  # one /24 per concurrent run: 10.231.<subnet>.0/24
        self.bridge = f"{self.prefix}-br"
        self.hosts = {name: Host(name, f"{self.prefix}-{name}", f"10.231.{subnet}.{i + 1}", f"{self.prefix}v{i}")
                      for i, name in enumerate(names)}
        self._made: list[str] = []
        atexit.register(self.close)

    def start(self) -> "NamespaceNet":
        try:
            self._ns(self.bridge)
            _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge, "link", "set", "br0", "up")
            for host in self.hosts.values():
                self._ns(host.netns)
                inner, outer = host.veth, f"{host.veth}b"
                _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
                _ip("link", "set", inner, "netns", host.netns)
                _ip("link", "set", outer, "netns", self.bridge)
                _ip("-n", self.bridge, "link", "set", outer, "master", "br0")
                _ip("-n", self.bridge, "link", "set", outer, "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", inner)
                _ip("-n", host.netns, "link", "set", inner, "up")
        except BaseException:
            self.close()
            raise
        return self

    def _ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def command(self, host: Host, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", host.netns, *argv]

    def link(self, host: Host, up: bool) -> None:
        """Plugs a host's cable in or out at the bridge."""
        _ip("-n", self.bridge, "link", "set", f"{host.veth}b", "up" if up else "down")

    def kill(self, host: Host) -> None:
        """Kills every process in a host: it goes down as a machine that lost power."""
        _kill_all(host.netns)

    def close(self) -> None:
        for name in reversed(self._made):
            _kill_all(name)
        for name in reversed(self._made):
            for _ in range(20):  # a killed process may hold the namespace for a moment
                if subprocess.run(["ip", "netns", "del", name], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        self._made.clear()


def _kill_all(netns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
