"""What the multi-node tests share: `pdmesh serve` in the head's namespace, the scripts run
there (an OTLP receiver, a readiness wait, the openai client streaming) and their settings."""
from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator

import yaml

from tests.gateway.support import ENGINE

HTTP_PORT = 8000  # inside the head's own namespace: no other process can hold it

# An OTLP receiver in the head's namespace: the actors on the other nodes export their spans to it.
OTLP = """
import json, sys
from concurrent import futures
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from tests.support.otlp import OtlpReceiver
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
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=int(sys.argv[3]), stream=True,
                                           logprobs=1, temperature=0,
                                           extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += [int(t.removeprefix("token_id:")) for t in chunk.choices[0].logprobs.tokens]
    out.append(tokens)
print(json.dumps(out))
"""

PROMPTS = [list(range(40, 70)), list(range(100, 157))]
MAX_TOKENS = 12  # what STREAM asks for each of PROMPTS

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


def spans_after(otlp, before: int, count: int) -> list[dict]:
    """The kv_transfer spans after the first `before`, once `count` of them came (spans leave
    each actor in batches), or what came within about 10 s."""
    for _ in range(100):
        spans = otlp()[before:]
        if len(spans) >= count:
            break
        time.sleep(0.1)
    return spans


@contextlib.contextmanager
def served(cluster, checkpoint, tmp_path, backend: str, otlp_endpoint: str) -> Iterator[str]:
    """`pdmesh serve` (serve()) once it answers; yields its URL. On exit it is stopped by
    SIGTERM, and every actor's node has its resources free again."""
    head = cluster.head
    url = f"http://{head.address}:{HTTP_PORT}"
    gateway = serve(cluster, checkpoint, tmp_path, backend, otlp_endpoint)
    try:
        try:
            cluster.python(head, READY, timeout=300, args=(url,))
        except RuntimeError:
            raise AssertionError((tmp_path / f"serve-{backend}.log").read_text()[-4000:]) from None
        yield url
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(60)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(10)
        cluster.python(head, FREED, timeout=90, args=(cluster.ray_address,))


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
