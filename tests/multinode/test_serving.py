"""`pdmesh serve` on a cluster of three network namespaces: the gateway and the Ray head in
one, the prefill actor on a second node and the decode actor on a third (placed by the
custom resources in the scenario's hardware), and the real `openai` client in the head's
namespace. The KV crosses the network between the two nodes: no loopback reaches across,
and the transfer span names the decode node's address as its peer."""
from __future__ import annotations

import json

import pytest

from tests.multinode.serving import MAX_TOKENS, PROMPTS, STREAM, served, spans_after


@pytest.mark.parametrize("backend", ["ucx", "tcp"])
def test_kv_crosses_the_network_between_nodes(netns_cluster, checkpoint, tmp_path, expected, otlp, backend):
    head, decode = netns_cluster.head, netns_cluster.nodes["decode"]
    with served(netns_cluster, checkpoint, tmp_path, backend, otlp.endpoint) as url:
        before = len(otlp())
        got = netns_cluster.python(head, STREAM, timeout=300, args=(url, json.dumps(PROMPTS), str(MAX_TOKENS)))
        assert got == expected
        spans = spans_after(otlp, before, len(PROMPTS))
        assert len(spans) == len(PROMPTS), spans
        for span in spans:
            host, _, port = span["kv.peer"].rpartition(":")
            assert (span["kv.backend"], host) == (backend, decode.address) and int(port) > 0
            assert not host.startswith("127.") and int(span["kv.bytes"]) > 0
