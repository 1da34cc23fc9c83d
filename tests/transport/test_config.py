"""Backend choice by config: bad settings and missing backends give clear errors."""
from __future__ import annotations

import sys

import pytest

from transport import TransferError, TransportConfig, available, make_sender
from transport.backends.ucx import load_ucxx


@pytest.mark.parametrize("fields, message", [
    ({"backend": "rdma"}, "unknown transport backend 'rdma'"),
    ({"backend": "tcp", "secret": "short"}, "shared secret of 16"),
    ({"backend": "ucx"}, "shared secret of 16"),
    ({"backend": "local", "lease_ttl_s": 0}, "must be positive"),
    ({"backend": "local", "gather_threshold": 0}, "must be positive"),
    ({"backend": "tcp", "secret": "x" * 16, "path": "gpu"}, "unknown transport path 'gpu'"),
    ({"backend": "local", "path": "staged"}, "path staged needs the ucx or tcp backend"),
])
def test_bad_config(fields, message):
    with pytest.raises(ValueError, match=message):
        TransportConfig(**fields)


def test_local_needs_no_secret():
    assert TransportConfig(backend="local").secret == ""


def test_availability():
    assert available("tcp") is None and available("local") is None
    assert "unknown backend" in available("rdma")


def test_missing_ucxx_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ucxx", None)  # as if the wheel were not installed
    with pytest.raises(TransferError, match=r"\[unavailable\] the ucx backend needs ucxx"):
        load_ucxx()
    assert "needs ucxx" in available("ucx")
    with pytest.raises(TransferError, match="needs ucxx"):
        make_sender(TransportConfig(backend="ucx", secret="x" * 16))
