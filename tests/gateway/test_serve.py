"""`pdmesh serve` as a real process: it prints its addresses, answers, and on SIGTERM stops
cleanly, leaving no process behind (its embedded Ray included); vLLM's flags, a log fit for a
file (text or JSON, no ANSI codes, no tracebacks for a gRPC client on the HTTP port), an
optional access log, and one clean error line for a bad model path."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from gateway.bench_serve_servers import alive, descendants
from tests.gateway.serve_process import ENV, Served, serving


def _ops(served: Served, *args: str) -> subprocess.CompletedProcess:
    """The ops CLI as an operator on the gateway's host runs it: no address, no key."""
    env = {k: v for k, v in served.env.items() if k not in ("PDMESH_ADDRESS", "PDMESH_ADMIN_KEY")}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_serve_starts_answers_the_ops_cli_with_no_key_and_stops_cleanly(checkpoint, tmp_path):
    with serving(checkpoint, tmp_path) as served:
        proc = served.proc
        with urllib.request.urlopen(served.http_url + "/health", timeout=30) as reply:
            assert reply.status == 200
        request = urllib.request.Request(served.http_url + "/v1/completions", data=json.dumps(
            {"prompt": "hello", "max_tokens": 3}).encode(), headers={"Authorization": "Bearer serve-key"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert json.load(reply)["usage"]["completion_tokens"] == 3
        [credential] = (tmp_path / "pdmesh-home").iterdir()  # the local admin credential
        assert credential.stat().st_mode & 0o777 == 0o600 and f"credential: {credential})" in "".join(served.head)
        status = _ops(served, "status", "-o", "json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["scenarios"][0]["scenario"] == "tiny"
        off = _ops(served, "controller", "off")
        assert off.returncode == 0, off.stderr
        below = descendants(proc.pid)
        assert below  # Ray's processes and the actors
        proc.send_signal(signal.SIGTERM)
        rest = served.wait(120)
        assert proc.returncode == 0, rest[-3000:]
        assert "shutting down" in rest
        assert re.search(r"local credential from ipv4:127\.0\.0\.1:\d+: controller off \(every scenario\): done", rest)
        assert not [pid for pid in below if alive(pid)]
        assert not credential.exists()  # a clean exit takes it away


def _post(served: Served, body: dict, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(served.http_url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_vllm_flags_json_log_access_log_and_a_grpc_client_on_the_http_port(checkpoint, tmp_path):
    import grpc

    args = ("--served-model-name", "tiny-chat", "--max-model-len", "64", "--api-key", "flag-key",
            "--log-format", "json", "--access-log")
    (tmp_path / "pdmesh-home").write_text("")  # a file where the local credential's folder goes: serve goes on
    with serving(checkpoint, tmp_path, *args) as served:
        head = "".join(served.head)
        assert "`pdmesh status` on this host (with an admin key)" in head
        assert "no local admin credential: [Errno 17] File exists" in head
        assert "starting the actors" in head and "tiny: 1 prefill + 1 decode on tiny-chat" in head
        assert re.search(r"tiny-p\d+ serves as prefill on cpu \(pid \d+\), started in [\d.]+ s", head)
        assert "{'actor_id'" not in head  # one line per actor, no dict dump
        status, reply = _post(served, {"model": "tiny-chat", "prompt": "hello", "max_tokens": 2}, "flag-key")
        assert status == 200 and reply["model"] == "tiny-chat"
        assert _post(served, {"prompt": "hello", "max_tokens": 2}, "serve-key")[0] == 200  # the env's key still
        status, reply = _post(served, {"prompt": [5] * 70, "max_tokens": 2}, "flag-key")
        assert status == 400 and "context is 64 tokens" in reply["error"]["message"]
        with grpc.insecure_channel(served.http_url.removeprefix("http://")) as channel:
            with pytest.raises(grpc.RpcError):
                channel.unary_unary("/pdmesh.v1.Inference/Generate")(b"", timeout=5)
        served.proc.send_signal(signal.SIGTERM)
        rest = served.wait(120)
    assert served.proc.returncode == 0, rest[-3000:]
    lines = (head + rest).splitlines()
    assert not [line for line in lines if "\x1b[" in line]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    ours = [r for r in records if r["logger"].startswith(("gateway", "mesh", "aiohttp"))]
    assert ours and all(set(r) >= {"ts", "level", "logger", "message"} for r in ours)
    access = [r["message"] for r in records if r["logger"] == "aiohttp.access"]
    assert any('"POST /v1/completions HTTP/1.1" 200' in m for m in access), access
    not_http = [r for r in records if "not an HTTP/1 request" in r["message"]]
    assert not_http and all(r["level"] == "warning" and "exc" not in r for r in not_http)
    assert "Traceback" not in head + rest


def test_the_port_flag_is_http_ports_alias():
    from gateway.serve import serve

    assert serve.make_context("serve", ["--port", "1234"]).params["http_port"] == 1234


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "pdmesh: error: /nonexistent/model/config.json not found: point --model at"),
    (["--config", "/dev/null"], "pdmesh: error: /dev/null: expected a mapping"),
])
def test_a_bad_model_path_is_one_error_line(args, message):
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", *args], env=ENV, capture_output=True,
                          text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith(message), done.stderr


def test_the_log_has_no_ray_unhandled_error_traceback_and_json_is_one_line():
    script = ("import logging; from gateway import logs; logs.configure('info', 'json'); "
              "logging.getLogger('ray._private.worker').error(\"Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED_"
              "ERRORS=1'): ray::MeshActor.decode()\\nTraceback (most recent call last):\\n  File 'x'\"); "
              "logging.getLogger('ray').info('from ray'); "
              "\ntry:\n    1 / 0\nexcept ZeroDivisionError:\n    logging.getLogger('gateway.x').exception('failed')")
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [(r["logger"], r["message"]) for r in records] == [("ray", "from ray"), ("gateway.x", "failed")], done.stderr
    assert "Unhandled error" not in done.stderr and "ZeroDivisionError" in records[1]["exc"]
