"""Faults on the namespace cluster: the decode node's cable is pulled in the middle of a stream.
The stream fails cleanly by its deadline (no other node offers decode), the pool marks the
node's decode actor dead (/health names it), and once the node is back (rebooted: a fresh Ray
node at the same address) the supervisor's replacement lands on it and serves, its KV still
arriving over the network from the prefill node."""
from __future__ import annotations

import json
import re
import subprocess
import time

from tests.multinode.serving import MAX_TOKENS, PROMPTS, STREAM, served, spans_after

DEADLINE_S = 20

# Streams one long completion; prints a line once tokens flow, then how the stream ended.
LONG = """
import json, sys
import openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0, timeout=120)
model = client.models.list().data[0].id
tokens, error = 0, None
try:
    for chunk in client.completions.create(model=model, prompt=list(range(30, 60)), max_tokens=200, stream=True,
                                           temperature=0, extra_body={"ignore_eos": True},
                                           extra_headers={"x-pdmesh-timeout-s": sys.argv[2]}):
        tokens += 1
        if tokens == 3:
            print("flowing", flush=True)
except openai.APIError as e:
    error = f"{type(e).__name__}: {e}"
print(json.dumps({"tokens": tokens, "error": error}), flush=True)
"""

HEALTH = """
import json, sys, urllib.request, urllib.error
try:
    body = urllib.request.urlopen(sys.argv[1] + "/health", timeout=5).read()
except urllib.error.HTTPError as e:
    body = e.read()
print(json.dumps(json.loads(body)))
"""


def wait_health(cluster, url: str, done, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        health = cluster.python(cluster.head, HEALTH, timeout=30, args=(url,))
        if done(health):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(1)


def test_decode_node_lost_mid_stream_then_back(netns_cluster, checkpoint, tmp_path, expected, otlp):
    cluster, head, decode = netns_cluster, netns_cluster.head, netns_cluster.nodes["decode"]
    with served(cluster, checkpoint, tmp_path, "tcp", otlp.endpoint) as url:
        try:
            stream = cluster.popen(head, ["python3", "-c", LONG, url, str(DEADLINE_S)], stdout=subprocess.PIPE,
                                   text=True)
            assert stream.stdout.readline().strip() == "flowing"
            started = time.monotonic()
            cluster.link(decode, False)
            ended = json.loads(stream.stdout.readline())
            stream.wait(30)
            # ended cleanly, by the deadline (and a margin for the gateway's own wait on the actor)
            assert ended["error"] and ended["tokens"] < 200 and time.monotonic() - started < DEADLINE_S + 15, ended
            dead = wait_health(cluster, url, lambda h: re.search(r"chat-d\d+ dead", json.dumps(h)))
            assert "no serving decode actor" in dead["problems"][0]

            cluster.kill(decode)  # the node comes back as a rebooted machine: a new Ray node at its address
            cluster.link(decode, True)
            cluster.start_ray(decode)
            cluster.wait_nodes(3)
            wait_health(cluster, url, lambda h: h.get("status") == "ok", timeout_s=240)
            before = len(otlp())
            assert cluster.python(head, STREAM, timeout=300, args=(url, json.dumps(PROMPTS), str(MAX_TOKENS))) == expected
            spans = spans_after(otlp, before, len(PROMPTS))
            assert {s["kv.peer"].rpartition(":")[0] for s in spans} == {decode.address}
        finally:
            cluster.link(decode, True)  # before the gateway stops: its actors' resources are freed on every node
