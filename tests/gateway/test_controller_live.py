"""The ratio controller live, on a real local Ray: a scenario started at a poor ratio (1
prefill : 3 decode) under a prompt-heavy load; once the controller is on, it flips decode
actors to prefill, TTFT attainment rises, and no request is lost during the flips.

The load is closed-loop (a fixed number of clients, each sending its next request when the
last one ends), so that it is the same at every split. Waits poll for a state with a bound
that only turns a hang into a failure; nothing asserts on time."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from gateway.proto import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.gateway.support import ADMIN, API_KEY, assert_no_blocks_held, serving

CLIENTS = 6
PROMPT_TOKENS = 1500  # prompt-heavy: long prompts, two output tokens
OUTPUT_TOKENS = 2
TTFT_S = 0.25
BOUND_S = 180  # on each wait: a bound that turns a hang into a failure


@dataclass
class Load:
    """CLIENTS clients over gRPC, each one request at a time, until stopped; every request's
    TTFT (as the client sees it) or error."""
    address: str
    done: list = field(default_factory=list)  # (ended at, ttft_s or None, error or None)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def _client(self, i: int) -> None:
        prompt = [(7 * i + k) % 1000 + 1 for k in range(PROMPT_TOKENS)]
        with grpc.insecure_channel(self.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while not self.stop.is_set():
                start, ttft, error = time.monotonic(), None, None
                request = inference_pb2.GenerateRequest(
                    token_ids=inference_pb2.TokenIds(ids=prompt),
                    sampling=inference_pb2.SamplingOptions(max_tokens=OUTPUT_TOKENS, temperature=0, ignore_eos=True))
                try:
                    n = 0
                    for reply in stub.Generate(request, metadata=(("authorization", f"Bearer {API_KEY}"),),
                                               timeout=120):
                        ttft = ttft if ttft is not None else time.monotonic() - start
                        n += len(reply.token_ids)
                    if n != OUTPUT_TOKENS:
                        error = f"{n} tokens"
                except grpc.RpcError as e:
                    error = f"{e.code().name}: {e.details()}"
                self.done.append((time.monotonic(), ttft, error))

    def requests_since(self, t: float) -> list:
        return [r for r in list(self.done) if r[0] > t]

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(BOUND_S)


def wait_for(what: str, check, bound_s: float = BOUND_S, every_s: float = 0.2):
    end = time.monotonic() + bound_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what} after {bound_s} s")
        time.sleep(every_s)


def attainment(requests: list) -> float:
    return sum(1 for _, ttft, _ in requests if ttft is not None and ttft <= TTFT_S) / len(requests)


@pytest.fixture(scope="module")
def poor_ratio(checkpoint, ray_cluster):
    from gateway.config import parse

    small = {"accelerator": "cpu", "num_cpus": 1}
    config = parse({
        "scenarios": [{"name": "chat", "model": str(checkpoint("llama", "float32")),
                       "slo": {"ttft_s": TTFT_S, "tpot_s": 1.0}, "prefill": 1, "decode": 3,
                       "limits": {"prefill": {"min": 1, "max": 3}, "decode": {"min": 1, "max": 3}},
                       "hardware": {"prefill": small, "decode": small}}],
        "engine": {"dtype": "float32", "num_blocks": 1024, "block_size": 16, "threads": 1, "max_model_len": 2048},
        "transport": {"lease_ttl_s": 10.0, "timeout_s": 20.0},
        "gateway": {"admission_timeout_s": 60.0},
        # short intervals and dwell, so that the test takes seconds; off until the test turns it on
        "controller": {"enabled": False, "settings": {"interval_s": 0.5, "min_dwell_s": 1.0, "confirm": 2}},
    })
    with serving(config) as running:
        yield running


def test_controller_moves_a_poor_ratio_toward_prefill_and_ttft_attainment_rises(poor_ratio):
    with grpc.insecure_channel(poor_ratio.grpc_address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)

        def split() -> tuple[int, int]:
            s = admin.GetController(admin_pb2.GetControllerRequest(), metadata=ADMIN, timeout=30).scenarios[0]
            return s.prefill, s.decode

        assert split() == (1, 3)
        load = Load(poor_ratio.grpc_address)
        load.start()
        try:
            begun = time.monotonic()
            wait_for("requests at 1P:3D", lambda: len(load.requests_since(begun)) >= 30)
            before = load.requests_since(begun)
            admin.SetController(admin_pb2.SetControllerRequest(scenario="chat", enabled=True), metadata=ADMIN,
                                timeout=30)
            wait_for("the controller to reach 3P:1D", lambda: split() == (3, 1))
            settled = time.monotonic()
            wait_for("requests at the better split", lambda: len(load.requests_since(settled)) >= 30)
            after = load.requests_since(settled)
        finally:
            load.close()
        q = lambda rs: [round(sorted(r[1] or 99 for r in rs)[int(f * len(rs))], 3) for f in (0.1, 0.5, 0.9)]  # noqa
        print(f"TTFT attainment {attainment(before):.2f} at 1P:3D -> {attainment(after):.2f} at 3P:1D; "
              f"TTFT p10/50/90 {q(before)} -> {q(after)} s")
        assert [r for r in load.done if r[2]] == []  # none lost, during the flips or otherwise
        assert attainment(after) > attainment(before)
        decisions = admin.GetDecisions(admin_pb2.GetDecisionsRequest(scenario="chat"), metadata=ADMIN,
                                       timeout=30).decisions
        assert len(decisions) >= 2 and all(d.action == "flip" and not d.failures for d in decisions)
        assert all(a.role == "prefill" for d in decisions for a in d.actions)
        assert "flip 1 decode -> prefill" in decisions[0].reason
        assert json.loads(decisions[0].inputs_json)["mean_prompt"] >= PROMPT_TOKENS
    assert_no_blocks_held(poor_ratio)
