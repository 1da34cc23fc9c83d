"""The session's one local Ray and what runs on it, for every test folder (registered by
tests/conftest.py): an in-test OTLP receiver, the Ray cluster (mesh.cluster.connect: token
authentication, loopback only) whose actors export spans to it, pools of tiny-model actors,
and the greedy tokens of the engine alone to compare them with.

There is one Ray per session whichever tests run, so that a test sees the same cluster alone,
in its folder or in the whole suite."""
from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from tests.support.otlp import OtlpReceiver

SECRET = "mesh-test-secret-0123456789"  # the transport's shared secret in the pools' actors
CPUS = 16  # logical CPUs: tiny actors ask for one each and mostly wait


@pytest.fixture(scope="session")
def otlp():
    """The receiver of every span the session's processes export (OTLP over gRPC, loopback)."""
    receiver = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver
    server.stop(0)


@pytest.fixture(scope="session")
def ray_cluster(otlp):
    """The session's local Ray, its actors exporting spans to the in-test receiver (the
    environment is set before Ray starts: its processes inherit it)."""
    from mesh.cluster import connect, disconnect

    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "50"}
    with pytest.MonkeyPatch.context() as env:
        for key, value in otel.items():
            env.setenv(key, value)
        connect(num_cpus=CPUS)
        yield
        disconnect()


@pytest.fixture(scope="module")
def make_pool(ray_cluster, checkpoint):
    """make_pool(prefill=1, decode=1, both=0, **engine_changes) -> a started Pool; closed after the module."""
    from mesh.api import EngineConfig
    from mesh.pool import Pool, PoolSpec
    from transport import TransportConfig

    pools = []

    def make(prefill=1, decode=1, both=0, backend="ucx", lease_ttl_s=3.0, faults="", fault_log="",
             layerwise_kv=False, hardware=None, **engine):
        """faults, fault_log: armed fault-injection points (mesh.faults) of every actor, replacements too.
        layerwise_kv: prefills send each layer's KV as soon as it is computed. hardware: each role's
        (mesh.hardware.Hardware, by role name), e.g. its tensor_parallel_size."""
        engine = {"model": str(checkpoint("llama", "float32")), "dtype": "float32", "num_blocks": 128,
                  "block_size": 4, "threads": 1, **engine}
        transport = {"backend": backend, "secret": SECRET, "lease_ttl_s": lease_ttl_s, "timeout_s": 5.0}
        roles = {"hardware": hardware} if hardware else {}
        pool = Pool(PoolSpec(f"t{len(pools)}", EngineConfig(**engine), TransportConfig(**transport),
                             ttft_budget_s=5.0, faults=faults, fault_log=fault_log or None, layerwise_kv=layerwise_kv,
                             **roles))
        asyncio.run(pool.scale(prefill=prefill, decode=decode, both=both))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        asyncio.run(pool.close())


@pytest.fixture(scope="session")
def reference(checkpoint):
    """reference(prompt ids, max_tokens) -> the greedy token ids of the engine alone, for comparison
    (one torch thread, as the actors run)."""
    from mesh.engine.config import EngineConfig
    from mesh.engine.engine import Engine
    from mesh.engine.sampling_params import SamplingParams

    engine = Engine(EngineConfig(model=str(checkpoint("llama", "float32")), dtype="float32", num_blocks=1024,
                                 block_size=4, threads=1))

    def greedy(prompt: list[int], max_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return engine.generate([prompt], params)[0].token_ids

    return greedy
