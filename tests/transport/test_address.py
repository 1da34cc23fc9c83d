"""Which address a KV receiver advertises: node environment, then config, then the node's own."""
from __future__ import annotations

import pytest

from transport.address import ENV_HOST, ENV_INTERFACE, AddressError, interface_address, interface_of, resolve_host


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
