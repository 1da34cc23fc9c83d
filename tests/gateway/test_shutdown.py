"""SIGTERM bounds every request by `--grace-s`, whichever API it came by: at the grace, an SSE
stream ends with an UNAVAILABLE error event and [DONE], a request waiting for its whole answer
gets 503, a gRPC stream UNAVAILABLE; then the process exits."""
from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc

from gateway.proto import inference_pb2 as pb
from gateway.proto import inference_pb2_grpc
from tests.gateway.serve_process import serving

KEY = {"Authorization": "Bearer serve-key"}
LONG = {"prompt": "hello", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}  # a minute or more here


def _sse(url: str, first: threading.Event) -> list[str]:
    """The stream's data events, `first` set at the first one."""
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps({**LONG, "stream": True}).encode(),
                                     headers=KEY)
    events = []
    with urllib.request.urlopen(request, timeout=300) as reply:
        for line in reply:
            if line.startswith(b"data: "):
                events.append(line[len(b"data: "):].strip().decode())
                first.set()
    return events


def _whole(url: str) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(LONG).encode(), headers=KEY)
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _grpc(address: str, first: threading.Event) -> grpc.RpcError | None:
    with grpc.insecure_channel(address) as channel:
        replies = inference_pb2_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
            text="hello", sampling=pb.SamplingOptions(max_tokens=3000, temperature=0, ignore_eos=True)),
            metadata=(("authorization", "Bearer serve-key"),), timeout=300)
        try:
            for _ in replies:
                first.set()
        except grpc.RpcError as e:
            return e
    return None


def _in_flight(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as reply:
        found = re.search(r'pdmesh:requests_in_flight\{model_name="[^"]*",scenario="tiny"\} (\S+)', reply.read().decode())
    return float(found.group(1)) if found else 0.0


def test_sigterm_ends_every_request_at_the_grace_and_exits(checkpoint, tmp_path):
    with serving(checkpoint, tmp_path, "--grace-s", "1", engine={"num_blocks": 4096}) as served:
        sse_first, grpc_first = threading.Event(), threading.Event()
        with ThreadPoolExecutor(3) as pool:
            sse = pool.submit(_sse, served.http_url, sse_first)
            grpc_call = pool.submit(_grpc, served.grpc_address, grpc_first)
            whole = pool.submit(_whole, served.http_url)
            assert sse_first.wait(120) and grpc_first.wait(120)
            for _ in range(600):  # until the whole-answer request is in flight too
                if _in_flight(served.http_url) >= 3:
                    break
                assert not whole.done(), whole.result()
                time.sleep(0.1)
            served.proc.send_signal(signal.SIGTERM)
            events, error, (status, body) = sse.result(60), grpc_call.result(60), whole.result(60)
        log = served.wait(60)  # the bug this guards against ran HTTP streams for 93 s past SIGTERM
        assert served.proc.returncode == 0, log[-3000:]

    assert events[-1] == "[DONE]"
    sse_error = json.loads(events[-2])["error"]
    assert (sse_error["type"], sse_error["code"]) == ("server_error", 503) and "grace period of 1 s ran out" in sse_error["message"]
    assert not any(json.loads(e)["choices"][0]["finish_reason"] for e in events[:-2])  # cut, not finished
    assert status == 503 and "grace period of 1 s ran out" in body["error"]["message"]
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    assert "grace period of 1 s ran out" in error.details()
