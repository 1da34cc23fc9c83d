"""`pdmesh serve` on a cluster of three network namespaces: the gateway and the Ray head in
one, the prefill actor on a second node and the decode actor on a third (placed by the
custom resources in the scenario's hardware), and the real `openai` client in the head's
namespace. The KV crosses the network between the two nodes: no loopback reaches across,
and the transfer span names the decode node's address as its peer."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest
import yaml

ENGINE = {"dtype": "float32", "num_blocks": 128, "block_size": 4, "threads": 1, "max_model_len": 256}
HTTP_PORT = 8000  # inside the head's own namespace: no other process can hold it

# An OTLP receiver in the head's namespace: the actors on the other nodes export their spans to it.
OTLP = """
import json, sys
from concurrent import futures
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from tests.gateway.conftest import OtlpReceiver
receiver, server = OtlpReceiver(), grpc.server(futures.ThreadPoolExecutor(2))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
print(server.add_insecure_port(sys.argv[1] + ":0"), flush=True)
server.start()
for _ in sys.stdin:  # each line asks for the kv_transfer spans so far
    spans = [{a.key: str(getattr(a.value, a.value.WhichOneof("value"))) for a in s.attributes}
             for _, s in receiver.spans if s.name == "kv_transfer"]
    print(json.dumps(spans), flush=True)
"""

READY = """
import sys, time, urllib.request
deadline = time.monotonic() + 240
while True:
    try:
        urllib.request.urlopen(sys.argv[1] + "/health", timeout=5).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(1)
print("true")
"""

STREAM = """
import json, sys
import openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0, timeout=120)
model = client.models.list().data[0].id
out = []
for prompt in json.loads(sys.argv[2]):
    tokens = []
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=12, stream=True, logprobs=1,
                                           temperature=0, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += [int(t) for t in chunk.choices[0].logprobs.tokens]
    out.append(tokens)
print(json.dumps(out))
"""

PROMPTS = [list(range(40, 70)), list(range(100, 157))]

FREED = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
deadline = time.monotonic() + 60
while any(ray.available_resources().get(r, 0) < 1 for r in ("pdmesh_prefill", "pdmesh_decode")):
    if time.monotonic() > deadline:
        raise SystemExit(f"actors still placed: {ray.available_resources()}")
    time.sleep(0.5)
print("true")
"""


@pytest.fixture(scope="module")
def reference(checkpoint):
    from mesh.engine.config import EngineConfig
    from mesh.engine.engine import Engine
    from mesh.engine.sampling_params import SamplingParams

    engine = Engine(EngineConfig(model=str(checkpoint("llama", "float32")), **ENGINE))
    return [engine.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
            for p in PROMPTS]


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


def serve(cluster, checkpoint, tmp_path, backend: str, otlp_endpoint: str) -> subprocess.Popen:
    """`pdmesh serve` in the head's namespace, joined to the cluster, prefill and decode on their nodes."""
    hardware = {role: {"num_cpus": 1, "resources": {f"pdmesh_{role}": 1}} for role in ("prefill", "decode")}
    config = {"scenarios": [{"name": "chat", "model": str(checkpoint("llama", "float32")), "hardware": hardware,
                             "slo": {"ttft_s": 30.0, "tpot_s": 5.0}}],
              "engine": ENGINE, "transport": {"backend": backend, "timeout_s": 20.0},
              "controller": {"enabled": False}}
    path = tmp_path / f"serve-{backend}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**cluster.env, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "50"}
    head = cluster.head
    return cluster.popen(head, ["python3", "-m", "gateway.cli", "serve", "--ray-address", cluster.ray_address,
                                "--config", str(path), "--host", head.address, "--http-port", str(HTTP_PORT),
                                "--grpc-port", "50051"],
                         env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"serve-{backend}.log", "w"))


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
            __import__("time").sleep(0.1)
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
