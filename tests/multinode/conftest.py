"""Three Ray nodes in their own network namespaces: head (the gateway's), prefill, decode.

UCX runs over TCP only: the namespaces share /dev/shm, and UCX's shared-memory transports
would reach across them without touching the network this proves."""
from __future__ import annotations

import pytest

from tests.multinode.netns import NamespaceCluster, unavailable


@pytest.fixture(scope="session")
def netns_cluster():
    reason = unavailable()
    if reason:
        pytest.skip(f"multi-node tests need network namespaces: {reason}")
    cluster = NamespaceCluster({"head": {}, "prefill": {"pdmesh_prefill": 1}, "decode": {"pdmesh_decode": 1}},
                               env={"UCX_TLS": "tcp"})
    try:
        yield cluster.start()
    finally:
        cluster.close()
