"""Three Ray nodes in their own network namespaces: head (the gateway's), prefill, decode.

UCX runs over TCP only: the namespaces share /dev/shm, and UCX's shared-memory transports
would reach across them without touching the network this proves."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.multinode.netns import NamespaceCluster, unavailable
from tests.multinode.serving import MAX_TOKENS, OTLP, PROMPTS


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


@pytest.fixture(scope="module")
def expected(reference):
    """The engine's own greedy tokens for each of PROMPTS, as many as STREAM asks for."""
    return [reference(p, MAX_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def otlp(netns_cluster):
    head = netns_cluster.head
    proc = netns_cluster.popen(head, ["python3", "-c", OTLP, head.address], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())

    def transfers() -> list[dict]:
        proc.stdin.write("\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    transfers.endpoint = f"http://{head.address}:{port}"
    yield transfers
    proc.kill()
    proc.wait(10)
