"""A real gateway for the tests: the session's local Ray, one scenario (1 prefill + 1 decode
actor on a tiny model), served from its own thread and event loop as `pdmesh serve` does,
with API keys, a small message limit and spans exported to an in-test OTLP receiver."""
from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

API_KEY = "test-inference-key"
ADMIN_KEY = "test-admin-key"
MAX_MESSAGE_BYTES = 64 * 1024
ENGINE = {"dtype": "float32", "num_blocks": 128, "block_size": 4, "threads": 1, "max_model_len": 256}


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects the spans every process exports (OTLP over gRPC)."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list:
        with self.lock:
            return [(service, s) for service, s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="session")
def otlp():
    receiver = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver
    server.stop(0)


@dataclass
class Running:
    gateway: object
    loop: asyncio.AbstractEventLoop
    grpc_address: str
    http_url: str

    def run(self, coro, timeout_s: float = 120):
        """Runs a coroutine on the gateway's loop (its pools live there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)


@contextlib.contextmanager
def serving(config, refresh_s: float = 0.2):
    """A Gateway on `config` with the test keys, on the session's Ray, served from its own thread
    and event loop as `pdmesh serve` does; stopped on exit."""
    import uvloop

    from gateway.auth import Keys
    from gateway.server import Gateway, Listen

    gw = Gateway(config, Keys((API_KEY,), (ADMIN_KEY,)), Listen(grpc_port=0, http_port=0), refresh_s=refresh_s)
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = Running(gw, loop, "", "")
    try:
        running.run(gw.start())
        running.grpc_address, running.http_url = gw.addresses["grpc"], gw.addresses["http"]
        yield running
    finally:
        running.run(gw.stop(grace_s=1.0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="session")
def ray_cluster(otlp):
    """The session's local Ray, its actors exporting spans to the in-test receiver."""
    from mesh.cluster import connect, disconnect

    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "50"}
    with pytest.MonkeyPatch.context() as env:
        for key, value in otel.items():
            env.setenv(key, value)
        connect(num_cpus=16)  # logical CPUs: tiny actors ask for one each and mostly wait
        yield
        disconnect()


@pytest.fixture(scope="session")
def gateway(checkpoint, ray_cluster):
    """One scenario, 1 prefill + 1 decode actor; the ratio controller off (pins still apply)."""
    from gateway.config import Control, Limits, default

    config = default(checkpoint("llama", "float32"), engine=ENGINE,
                     transport={"lease_ttl_s": 3.0, "timeout_s": 5.0},
                     gateway=Limits(max_message_bytes=MAX_MESSAGE_BYTES, admission_timeout_s=5.0),
                     controller=Control(enabled=False))
    with serving(config) as running:
        yield running


@pytest.fixture(scope="session")
def reference(checkpoint):
    """greedy(prompt ids, n) -> the token ids the engine alone makes."""
    from mesh.engine.config import EngineConfig
    from mesh.engine.engine import Engine
    from mesh.engine.sampling_params import SamplingParams

    engine = Engine(EngineConfig(model=str(checkpoint("llama", "float32")), **ENGINE))

    def greedy(prompt: list[int], n: int) -> list[int]:
        return engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].token_ids

    return greedy


def assert_no_blocks_held(running: Running) -> None:
    from tests.mesh.conftest import assert_no_blocks_held as check

    for scenario in running.gateway.fleet.scenarios.values():
        running.run(check(scenario.pool))


def replacement_of(running: Running, dead_id: str, scenario: str = "default") -> str:
    """The id of the actor the pool's supervisor started in place of `dead_id`, once it serves."""
    from tests.mesh.conftest import replaced

    return running.run(replaced(running.gateway.fleet.scenarios[scenario].pool, dead_id)).actor_id


@pytest.fixture(scope="module")
def client(gateway):
    """The real openai client on the shared gateway."""
    import openai

    with openai.OpenAI(base_url=gateway.http_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id
