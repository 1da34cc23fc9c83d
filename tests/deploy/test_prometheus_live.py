"""The shipped scrape config and dashboards against the real thing: a live `pdmesh serve` (its
own embedded Ray, one scenario of 2 prefill + 1 decode actors on a tiny model) under a little
load, scraped by a real Prometheus (Debian's package) started with deploy/observability/
prometheus.yml; then every PromQL query of every dashboard panel and annotation, evaluated
through Prometheus' HTTP API, must return data.

Two things differ from the shipped config, and only these: the gateway's target is the port
this test's `pdmesh serve` listens on, and the scrape interval is 1 s instead of 15 s, so that
the scrapes `rate()` needs take seconds. Waits poll for a state (a scrape that saw the load)
with a generous bound that only turns a hang into a failure; nothing asserts on time."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.deploy import support

ADMIN_KEY = "live-test-admin-key"
SCENARIO = "live"
WAIT_S = 300  # a bound on each wait: Ray and three actors start on two busy cores
REQUESTS_PER_ROUND = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, bound_s: float = WAIT_S, every_s: float = 0.5, alive=None):
    """Polls check() until it returns a true value; fails after bound_s or when alive() says the
    process it waits on has ended."""
    end = time.monotonic() + bound_s
    while True:
        value = check()
        if value:
            return value
        if alive is not None:
            alive()
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what} after {bound_s:.0f} s")
        time.sleep(every_s)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


class Process:
    """A child process whose output goes to a file that failures show."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict | None = None):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def stop(self, grace_s: float) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # pdmesh serve shuts its Ray down on SIGTERM
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def serve(checkpoint, tmp_path_factory):
    """`pdmesh serve` in a child process, once /health says every pool has serving actors."""
    support.serve_command()  # skips, saying why, while `pdmesh serve` does not exist
    folder = tmp_path_factory.mktemp("serve")
    small = {"accelerator": "cpu", "num_cpus": 0.5}  # three actors on the embedded Ray's two CPUs
    config = {
        "engine": {"dtype": "float32", "num_blocks": 128, "block_size": 4, "threads": 1, "max_model_len": 256},
        "transport": {"lease_ttl_s": 5.0, "timeout_s": 10.0},
        "scenarios": [{"name": SCENARIO, "model": str(checkpoint("llama", "float32")),
                       "slo": {"ttft_s": 2.0, "tpot_s": 0.2}, "prefill": 2, "decode": 1,
                       "limits": {"prefill": {"min": 1, "max": 2}, "decode": {"min": 1, "max": 2}},
                       "hardware": {"prefill": small, "decode": small}}],
        "controller": {"enabled": False},  # it moves only the pinned ratio: the test's flip, nothing more
    }
    (folder / "scenarios.yaml").write_text(yaml.safe_dump(config))
    (folder / "admin-keys").write_text(ADMIN_KEY + "\n")
    http_port, grpc_port = _free_port(), _free_port()
    # its own embedded Ray, and no spans sent to whatever another test's process set up
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "RAY_ADDRESS"))}
    proc = Process("pdmesh serve", [sys.executable, "-m", "gateway.cli", "serve",
                                    "--config", str(folder / "scenarios.yaml"), "--host", "127.0.0.1",
                                    "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                                    "--admin-key-file", str(folder / "admin-keys")],
                   folder / "serve.log", env)
    try:
        url = f"http://127.0.0.1:{http_port}"
        _wait("pdmesh serve's /health to answer 200", lambda: _get(url + "/health")[0] == 200, alive=proc.alive)
        proc.http_url, proc.grpc_address = url, f"127.0.0.1:{grpc_port}"
        yield proc
    finally:
        proc.stop(grace_s=60)


class Prometheus:
    def __init__(self, url: str, process: Process):
        self.url, self.process = url, process

    def query(self, expr: str) -> dict:
        """Prometheus' answer to an instant query: {"status": ..., "data": {"result": [...]}}."""
        status, body = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if not body:
            self.process.alive()
            pytest.fail(f"Prometheus did not answer {expr!r} (HTTP {status})")
        return json.loads(body)

    def value(self, expr: str) -> float | None:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def prometheus(serve, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: Debian's `prometheus` package has it (deploy/install.sh test installs it)"
    folder = tmp_path_factory.mktemp("prometheus")
    config = support.load_yaml(support.PROMETHEUS_CONFIG)[0]
    config["global"]["scrape_interval"] = "1s"
    job = next(j for j in config["scrape_configs"] if j["job_name"] == support.GATEWAY_JOB)
    job["static_configs"] = [{"targets": [serve.http_url.removeprefix("http://")]}]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = Process("prometheus", [binary, f"--config.file={folder / 'prometheus.yml'}",
                                  f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                   folder / "prometheus.log")
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}", proc)
        _wait("Prometheus to be ready", lambda: _get(prom.url + "/-/ready")[0] == 200, alive=proc.alive)
        _wait("a scrape of the gateway", lambda: prom.value(f'up{{job="{support.GATEWAY_JOB}"}}') == 1,
              alive=proc.alive)
        yield prom
    finally:
        proc.stop(grace_s=10)


def _send_round(serve) -> None:
    import openai

    with openai.OpenAI(base_url=serve.http_url + "/v1", api_key="open", max_retries=0, timeout=120) as client:
        model = client.models.list().data[0].id
        # ignore_eos: every request makes all its tokens, so TPOT has observations too
        for i in range(REQUESTS_PER_ROUND):
            prompt = f"request {i}: the quick brown fox jumps over the lazy dog"
            if i % 2:
                chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=6, stream=True,
                                                        temperature=0, extra_body={"ignore_eos": True}))
                assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)
            else:
                done = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                                 extra_body={"ignore_eos": True})
                assert done.choices[0].finish_reason == "length"


def _pin_one_prefill_to_decode(serve) -> None:
    """An operator's pin (`pdmesh ratio set live 1:2`), which the ratio controller carries out:
    a decision for the controller's annotation, an actor change for the other."""
    import grpc

    from gateway.proto import admin_pb2, admin_pb2_grpc

    with grpc.insecure_channel(serve.grpc_address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        auth = [("authorization", f"Bearer {ADMIN_KEY}")]
        status = admin.SetRatio(admin_pb2.SetRatioRequest(scenario=SCENARIO, prefill=1, decode=2), metadata=auth,
                                timeout=60)
        assert status.scenarios[0].pinned


@pytest.fixture(scope="module")
def loaded(serve, prometheus):
    """Two rounds of requests, each seen by a scrape (rate() needs two samples of a series that the
    first round creates), then a role flip by the ratio controller, seen by a scrape too."""
    total = f'sum(pdmesh:requests_total{{job="{support.GATEWAY_JOB}", scenario="{SCENARIO}"}})'
    for round_ in (1, 2):
        _send_round(serve)
        want = round_ * REQUESTS_PER_ROUND
        _wait(f"a scrape that counts {want} requests", lambda: (prometheus.value(total) or 0) >= want,
              alive=prometheus.process.alive)
    _pin_one_prefill_to_decode(serve)
    decode = f'sum(pdmesh:actors{{scenario="{SCENARIO}", role="decode", state="serving"}})'
    _wait("a scrape that shows the flipped actor", lambda: prometheus.value(decode) == 2,
          alive=prometheus.process.alive)
    return prometheus


def _cases():
    boards = support.dashboards()
    for q in support.all_prometheus_queries():
        # the windows span the whole test (loads a few minutes old at most), as a dashboard over it would
        expr = support.fill_variables(q.expr, boards[q.dashboard], rate_interval="5m", interval="5m")
        yield pytest.param(q, expr, id=f"{q.dashboard.removesuffix('.json')}: {q.title}")


@pytest.mark.parametrize("query, expr", list(_cases()))
def test_dashboard_query_returns_data(loaded, query, expr):
    answer = loaded.query(expr)
    assert answer["status"] == "success", f"{query}\n{answer}"
    assert answer["data"]["result"], f"no data for {query}\n(as sent: {expr})"
