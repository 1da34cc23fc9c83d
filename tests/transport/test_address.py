"""Which address a KV receiver advertises: node environment, then config, then the node's own."""
from __future__ import annotations

import asyncio
import os

import pytest

from tests.transport.support import SECRET, make_layout
from transport import TransferError, TransportConfig, make_receiver
from transport.address import (ENV_HOST, ENV_INTERFACE, AddressError, for_node, interface_address, interface_of,
                               resolve_host)
from transport.channel import Channel
from transport.peer import ListReserver


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(ENV_HOST, raising=False)
    monkeypatch.delenv(ENV_INTERFACE, raising=False)


def test_the_nodes_address_by_default():
    assert resolve_host("", "", "10.1.2.3") == "10.1.2.3"


def test_config_host_then_interface():
    assert resolve_host("10.9.9.9", "lo", "10.1.2.3") == "10.9.9.9"
    assert resolve_host("", "lo", "10.1.2.3") == "127.0.0.1"


def test_the_nodes_environment_wins(monkeypatch):
    monkeypatch.setenv(ENV_INTERFACE, "lo")
    assert resolve_host("10.9.9.9", "", "10.1.2.3") == "127.0.0.1"
    monkeypatch.setenv(ENV_HOST, "10.7.7.7")
    assert resolve_host("10.9.9.9", "", "10.1.2.3") == "10.7.7.7"


def test_an_unknown_interface_names_the_ones_there():
    with pytest.raises(AddressError, match=r"no network interface 'nope0'.*lo"):
        interface_address("nope0")


def test_no_address_at_all_says_what_to_set():
    with pytest.raises(AddressError, match="transport.host or transport.interface"):
        resolve_host("", "", "")


def test_interface_of_an_address():
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.254") is None


def test_a_config_on_a_node_advertises_the_nodes_address(monkeypatch):
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    config = for_node(TransportConfig(secret=SECRET), "10.1.2.3")
    assert config.host == "10.1.2.3" and "UCX_NET_DEVICES" not in os.environ


def test_a_named_interface_pins_ucx_to_it_unless_the_operator_did(monkeypatch):
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    assert for_node(TransportConfig(secret=SECRET, interface="lo"), "10.1.2.3").host == "127.0.0.1"
    assert os.environ["UCX_NET_DEVICES"] == "lo"
    monkeypatch.setenv("UCX_NET_DEVICES", "mlx5_0:1")
    monkeypatch.setenv(ENV_INTERFACE, "lo")
    for_node(TransportConfig(secret=SECRET), "10.1.2.3")
    assert os.environ["UCX_NET_DEVICES"] == "mlx5_0:1"


def test_the_tcp_backend_is_never_pinned(monkeypatch):
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    for_node(TransportConfig(backend="tcp", secret=SECRET, interface="lo"), "10.1.2.3")
    assert "UCX_NET_DEVICES" not in os.environ


async def test_a_receiver_off_any_node_listens_on_loopback():
    layout = make_layout()
    receiver = make_receiver(TransportConfig(backend="tcp", secret=SECRET), layout.allocate(), layout,
                             ListReserver(layout.num_blocks))
    await receiver.start()
    try:
        assert receiver.host == "127.0.0.1" and receiver.reserve(8).host == "127.0.0.1"
    finally:
        await receiver.close()


async def test_control_connection_errors_name_the_peer():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ch = await Channel.connect("127.0.0.1", port, 5.0)
        with pytest.raises(TransferError, match=rf"127\.0\.0\.1:{port} closed the connection"):
            await ch.recv("challenge")
        ch.close()
    finally:
        server.close()
        await server.wait_closed()
