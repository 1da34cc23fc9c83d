"""`pdmesh serve` on a cluster of three network namespaces: the gateway and the Ray head in
one, the prefill actor on a second node and the decode actor on a third (placed by the
custom resources in the scenario's hardware), and the real `openai` client in the head's
namespace. The KV crosses the network between the two nodes: no loopback reaches across,
and the transfer span names the decode node's address as its peer."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.multinode.serving import FREED, HTTP_PORT, PROMPTS, READY, STREAM, serve


@pytest.mark.parametrize("backend", ["ucx", "tcp"])
def test_kv_crosses_the_network_between_nodes(netns_cluster, checkpoint, tmp_path, reference, otlp, backend):
    head, decode = netns_cluster.head, netns_cluster.nodes["decode"]
    url = f"http://{head.address}:{HTTP_PORT}"
    gateway = serve(netns_cluster, checkpoint, tmp_path, backend, otlp.endpoint)
    try:
        try:
            netns_cluster.python(head, READY, timeout=300, args=(url,))
        except RuntimeError:
            raise AssertionError((tmp_path / f"serve-{backend}.log").read_text()[-4000:]) from None
        before = len(otlp())
        got = netns_cluster.python(head, STREAM, timeout=300, args=(url, json.dumps(PROMPTS)))
        assert got == reference
        for _ in range(100):  # spans leave each actor in batches
            spans = otlp()[before:]
            if len(spans) >= len(PROMPTS):
                break
            time.sleep(0.1)
        assert len(spans) == len(PROMPTS), spans
        for span in spans:
            host, _, port = span["kv.peer"].rpartition(":")
            assert (span["kv.backend"], host) == (backend, decode.address) and int(port) > 0
            assert not host.startswith("127.") and int(span["kv.bytes"]) > 0
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(60)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(10)
        netns_cluster.python(head, FREED, timeout=90, args=(netns_cluster.ray_address,))
