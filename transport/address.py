"""The address a KV receiver binds to and advertises: its node's, never loopback by accident.

In order: the node's environment (PDMESH_KV_HOST, or PDMESH_KV_INTERFACE naming a NIC:
for hosts whose NICs differ, set per node as UCX_NET_DEVICES would be), the config's
`host`, the config's `interface`, and last the node's own address as the cluster knows
it (Ray's node IP, passed in by the caller: transport knows nothing of Ray). Outside a
cluster (benchmarks, tests) that is loopback.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket

from .config import TransportConfig

ENV_HOST = "PDMESH_KV_HOST"
ENV_INTERFACE = "PDMESH_KV_INTERFACE"
LOOPBACK = "127.0.0.1"


class AddressError(ValueError):
    pass


def interface_address(name: str) -> str:
    """The first IPv4 address of a NIC (e.g. "eth0", "ib0", "bond0")."""
    import psutil

    nics = psutil.net_if_addrs()
    if name not in nics:
        raise AddressError(f"no network interface {name!r} on this node; it has: {', '.join(sorted(nics))}")
    for addr in nics[name]:
        if addr.family == socket.AF_INET:
            return addr.address
    raise AddressError(f"network interface {name!r} has no IPv4 address")


def interface_of(address: str) -> str | None:
    """The NIC holding `address`, for UCX_NET_DEVICES (None when no NIC has it)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addrs):
            return name
    return None


def resolve_host(host: str, interface: str, node_address: str) -> str:
    """Where this node's receiver listens and what senders on other nodes dial."""
    if os.environ.get(ENV_HOST):
        return os.environ[ENV_HOST]
    if os.environ.get(ENV_INTERFACE):
        return interface_address(os.environ[ENV_INTERFACE])
    if host:
        return host
    if interface:
        return interface_address(interface)
    if not node_address:
        raise AddressError("no address for the KV receiver: set transport.host or transport.interface")
    return node_address


def for_node(config: TransportConfig, node_address: str) -> TransportConfig:
    """The config with this node's receiver address filled in. A NIC named by the operator
    (transport.interface or PDMESH_KV_INTERFACE), or loopback for a loopback address, also
    pins UCX to it (UCX_NET_DEVICES, unless already set), before ucxx starts in this process. A NIC found only from the address does
    not: on an RDMA host the address is often an Ethernet NIC's while UCX should use the HCA."""
    host = resolve_host(config.host, config.interface, node_address)
    named = os.environ.get(ENV_INTERFACE) or config.interface
    # A receiver on loopback serves this host alone: UCX's TCP transport would otherwise
    # listen on every NIC of it.
    pin = named or (interface_of(host) if ipaddress.ip_address(host).is_loopback else None)
    if config.backend == "ucx" and pin:
        os.environ.setdefault("UCX_NET_DEVICES", pin)
    return dataclasses.replace(config, host=host)
