"""Three Ray nodes in their own network namespaces: head (the gateway's), prefill, decode."""
from __future__ import annotations

import pytest

from tests.multinode.netns import NamespaceCluster, unavailable


@pytest.fixture(scope="session")
def netns_cluster():
    reason = unavailable()
    if reason:
        pytest.skip(f"multi-node tests need network namespaces: {reason}")
    cluster = NamespaceCluster({"head": {}, "prefill": {"pdmesh_prefill": 1}, "decode": {"pdmesh_decode": 1}})
    try:
        yield cluster.start()
    finally:
        cluster.close()
