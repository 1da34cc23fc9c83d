"""`pdmesh bench serve` against the real shared gateway: figures that add up, 429s counted as
rejections, a trace's lengths sent as they are, the JSON schema; and the server orchestration
(a stand-in for vLLM's server, then a real `pdmesh serve`) leaving no process behind.

Run as a script, this file is the stand-in: an OpenAI-compatible server that streams one "a"
per requested token, taking vLLM's server arguments (--port, --served-model-name, --api-key).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.bench_serve_servers import alive
from gateway.cli import main
from tests.gateway.support import API_KEY

ROOT = Path(__file__).resolve().parents[2]
REPORT_KEYS = {"label", "base_url", "endpoint", "model", "requests", "rejected_by_status", "failed_by_status",
               "messages", "duration_s", "request_throughput", "request_goodput", "slo_attainment", "slo",
               "input_tokens", "output_tokens", "input_tokens_per_s", "output_tokens_per_s", "latency_ms"}


def bench(*args: str) -> dict:
    """`pdmesh bench serve ... --output json`, in this process; its JSON."""
    result = CliRunner().invoke(main, ["bench", "serve", *args, "--output", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def against(gateway, checkpoint, *args: str) -> dict:
    return bench("--base-url", gateway.http_url, "--model", str(checkpoint("llama", "float32")),
                 "--api-key", API_KEY, *args)


def assert_consistent(report: dict) -> None:
    r = report["requests"]
    assert r["sent"] == r["completed"] + r["rejected"] + r["failed"]
    assert r["planned"] == r["sent"] + r["not_sent"]
    assert r["rejected"] == sum(report["rejected_by_status"].values())
    assert r["failed"] == sum(report["failed_by_status"].values())
    assert set(report["rejected_by_status"]) <= {"429", "503"}
    if report["request_goodput"] is not None:
        assert 0 <= report["request_goodput"] <= report["request_throughput"]
    for metric, stats in report["latency_ms"].items():
        if r["completed"] and (metric != "tpot" or report["output_tokens"] > r["completed"]):
            assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"], (metric, stats)


def test_figures_add_up_and_goodput_follows_the_slo(gateway, checkpoint):
    load = ("--num-prompts", "6", "--random-input-len", "12", "--random-output-len", "5", "--max-concurrency", "3",
            "--ignore-eos")
    generous = against(gateway, checkpoint, *load, "--slo-ttft", "600", "--slo-tpot", "600")
    assert set(generous) == REPORT_KEYS
    assert set(generous["latency_ms"]) == {"ttft", "tpot", "itl", "e2el"}
    assert set(generous["latency_ms"]["ttft"]) == {"mean", "p50", "p90", "p99"}
    assert generous["requests"] == {"planned": 6, "sent": 6, "completed": 6, "rejected": 0, "failed": 0,
                                    "not_sent": 0}
    assert (generous["input_tokens"], generous["output_tokens"]) == (6 * 12, 6 * 5)  # the server's usage
    assert generous["request_goodput"] == generous["request_throughput"] and generous["slo_attainment"] == 1
    assert_consistent(generous)
    # the same load under an SLO nothing meets (vLLM's --goodput form, ms): goodput 0, throughput not
    strict = against(gateway, checkpoint, *load, "--goodput", "ttft:0.000001")
    assert strict["slo"] == {"ttft_s": pytest.approx(1e-9), "tpot_s": None, "e2el_s": None}
    assert strict["request_goodput"] == 0 < strict["request_throughput"]
    assert_consistent(strict)


def test_429s_are_rejections_not_failures(gateway, checkpoint, monkeypatch):
    monkeypatch.setattr(gateway.gateway.service.in_flight, "limit", 0)  # every request refused at once
    report = against(gateway, checkpoint, "--num-prompts", "3", "--random-input-len", "8", "--random-output-len", "2")
    assert report["requests"]["rejected"] == 3 and report["rejected_by_status"] == {"429": 3}
    assert report["requests"]["failed"] == 0 and report["request_throughput"] == 0
    assert "gateway.max_concurrent_requests" in report["messages"]["429"]  # the server's own words
    assert_consistent(report)


def test_a_silent_server_times_out_and_no_request_goes_after_the_duration(checkpoint):
    from gateway.bench_serve_workload import Shape, build
    from mesh.engine.tokenizer import Tokenizer

    # the kernel completes connections up to the backlog; nothing ever reads or answers them
    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:
        load = ("--num-prompts", "8", "--random-input-len", "4", "--random-output-len", "2", "--request-rate", "4")
        report = bench("--base-url", f"http://127.0.0.1:{silent.getsockname()[1]}",
                       "--model", str(checkpoint("llama", "float32")), *load, "--duration", "1",
                       "--request-timeout", "0.5")
    planned = build(Shape(num_prompts=8, random_input_len=4, random_output_len=2, request_rate=4),
                    Tokenizer(checkpoint("llama", "float32")))
    due = sum(p.at_s < 1 for p in planned)  # the seeded arrivals before the duration's end
    assert 0 < due < 8
    assert report["requests"] == {"planned": 8, "sent": due, "completed": 0, "rejected": 0, "failed": due,
                                  "not_sent": 8 - due}
    assert report["failed_by_status"] == {"timeout": due}
    assert_consistent(report)


MOONCAKE = [{"timestamp": 0, "input_length": 9, "output_length": 3, "hash_ids": [0]},
            {"timestamp": 50, "input_length": 17, "output_length": 6, "hash_ids": [1]},
            {"timestamp": 120, "input_length": 300, "output_length": 2, "hash_ids": [2]}]  # past max_model_len


def test_trace_replay_sends_the_traces_lengths(gateway, checkpoint, tmp_path):
    from gateway.bench_serve_workload import Shape, build
    from mesh.engine.tokenizer import Tokenizer

    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(row) + "\n" for row in MOONCAKE))
    planned = build(Shape("mooncake", str(trace)), Tokenizer(checkpoint("llama", "float32")))
    assert [(len(p.prompt_ids), p.output_tokens, p.at_s) for p in planned] == [(9, 3, 0.0), (17, 6, 0.05),
                                                                               (300, 2, 0.12)]
    report = against(gateway, checkpoint, "--dataset-name", "mooncake", "--dataset-path", str(trace), "--ignore-eos")
    # the two that fit come back with exactly their lengths; the long one is refused as the server says
    assert (report["input_tokens"], report["output_tokens"]) == (9 + 17, 3 + 6)
    assert report["requests"]["completed"] == 2 and report["failed_by_status"] == {"400": 1}
    assert_consistent(report)


def test_chat_prompts_have_their_planned_length(checkpoint):
    from gateway.bench_serve_workload import Shape, build
    from mesh.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(checkpoint("llama", "float32"))
    planned = build(Shape(num_prompts=5, random_input_len=40, random_range_ratio=0.5, chat=True, seed=3), tokenizer)
    assert [len(tokenizer.encode(p.prompt_text, add_special_tokens=False)) for p in planned] == \
        [len(p.prompt_ids) for p in planned]
    again = build(Shape(num_prompts=5, random_input_len=40, random_range_ratio=0.5, chat=True, seed=3), tokenizer)
    assert again == planned  # the same seed: the same load for every server


def test_a_trace_of_another_format_is_named(tmp_path, checkpoint):
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps(MOONCAKE[0]) + "\n")
    result = CliRunner().invoke(main, ["bench", "serve", "--model", str(checkpoint("llama", "float32")),
                                          "--dataset-name", "burstgpt", "--dataset-path", str(trace)])
    assert result.exit_code == 1 and "is a mooncake trace" in result.output


def test_comparing_needs_one_dtype_for_both_servers(tmp_path, checkpoint):
    config = tmp_path / "scenarios.yaml"
    config.write_text(json.dumps({"scenarios": [{"name": "tiny", "model": str(checkpoint("llama", "float32")),
                                                 "slo": {"ttft_s": 1.0, "tpot_s": 1.0}}]}))
    args = ["bench", "serve", "--config", str(config), "--vllm-python", str(_fake_python(tmp_path)),
            "--server-log-dir", str(tmp_path / "logs"), "--num-prompts", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "set engine.dtype" in result.output
    result = CliRunner().invoke(main, [*args, "--dtype", "bfloat16"])
    assert result.exit_code == 1 and "takes the dtype from" in result.output


# -- the servers under test -----------------------------------------------------------------------

def _fake_python(tmp_path: Path) -> Path:
    """A "python" that runs this file's stand-in in place of `-m vllm.entrypoints.openai.api_server`."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nshift 2\nPYTHONPATH={ROOT} exec {sys.executable} {__file__} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_a_server_starts_answers_and_stops_with_everything_it_started(tmp_path):
    from gateway.bench_serve_servers import ServerUnderTest, vllm_command

    command = vllm_command(str(_fake_python(tmp_path)), "ckpt", "float32", "tiny", "k", ("--child", "stubborn"))
    with ServerUnderTest(command, tmp_path / "log", "k", ready_timeout_s=60, stop_timeout_s=2) as server:
        pids = server.pids()
        assert len(pids) == 2  # the server, and a child of its own that ignores SIGTERM
    assert not [pid for pid in pids if alive(pid)]


def test_a_server_that_never_gets_ready_is_stopped_with_its_log(tmp_path):
    from gateway.bench_serve_servers import ServerCommand, ServerError, ServerUnderTest

    command = ServerCommand("mute", (sys.executable, "-c", "import time; print('loading', flush=True); "
                                                          "time.sleep(600)"), "http://127.0.0.1:9")
    server = ServerUnderTest(command, tmp_path / "log", ready_timeout_s=1, stop_timeout_s=2)
    with pytest.raises(ServerError, match="within 1 s") as info:
        with server:
            pass
    assert "loading" in str(info.value)
    assert not alive(server.proc.pid)


def test_against_vllm_runs_both_servers_one_after_the_other(tmp_path, checkpoint, monkeypatch):
    from gateway import bench_serve_servers

    stopped: list[set[int]] = []
    exit_ = bench_serve_servers.ServerUnderTest.__exit__

    def recorded(self, *exc):
        stopped.append(self.pids())
        return exit_(self, *exc)

    monkeypatch.setattr(bench_serve_servers.ServerUnderTest, "__exit__", recorded)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    config = tmp_path / "scenarios.yaml"
    config.write_text(json.dumps({
        "scenarios": [{"name": "tiny", "model": str(checkpoint("llama", "float32")),
                       "slo": {"ttft_s": 30.0, "tpot_s": 5.0}}],
        "engine": {"dtype": "float32", "num_blocks": 64, "block_size": 4, "threads": 1},
        "controller": {"enabled": False}}))
    report = bench("--config", str(config), "--vllm-python", str(_fake_python(tmp_path)), "--api-key", "k",
                   "--num-prompts", "4", "--random-input-len", "10", "--random-output-len", "3", "--ignore-eos",
                   "--max-concurrency", "2", "--ready-check-timeout-sec", "300",
                   "--server-log-dir", str(tmp_path / "logs"), "--plot", str(tmp_path / "plots"))
    runs = report["runs"]
    assert list(runs) == ["vllm", "pdmesh"]
    for run in runs.values():
        assert run["requests"]["completed"] == 4 and run["output_tokens"] == 12
        assert run["slo"] == {"ttft_s": 30.0, "tpot_s": 5.0, "e2el_s": None}  # the scenario's
        assert_consistent(run)
    assert runs["vllm"]["base_url"] != runs["pdmesh"]["base_url"]
    assert report["ratio"]["output tokens/s"] == pytest.approx(
        runs["pdmesh"]["output_tokens_per_s"] / runs["vllm"]["output_tokens_per_s"])
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"ttft_cdf.png", "tpot_cdf.png", "latency_over_time.png",
                                                               "goodput_over_time.png", "load_over_time.png"}
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {"vllm.log", "pdmesh.log"}
    assert len(stopped) == 2 and len(stopped[1]) > 1  # pdmesh serve's Ray came along
    assert not [pid for pids in stopped for pid in pids if alive(pid)]


def test_against_vllm_with_a_running_pdmesh_starts_only_vllm(gateway, tmp_path, checkpoint, monkeypatch):
    from gateway import bench_serve_servers

    started = []
    enter = bench_serve_servers.ServerUnderTest.__enter__
    monkeypatch.setattr(bench_serve_servers.ServerUnderTest, "__enter__",
                        lambda self: started.append(self.command.label) or enter(self))
    report = against(gateway, checkpoint, "--vllm-python", str(_fake_python(tmp_path)),
                     "--server-log-dir", str(tmp_path / "logs"), "--num-prompts", "2",
                     "--random-input-len", "6", "--random-output-len", "2", "--ignore-eos")
    assert started == ["vllm"]
    assert report["runs"]["pdmesh"]["base_url"] == gateway.http_url
    assert [run["requests"]["completed"] for run in report["runs"].values()] == [2, 2]


# -- the stand-in ----------------------------------------------------------------------------------

def _standin(argv: list[str]) -> None:
    import argparse

    from aiohttp import web

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--child", help="'stubborn': start a child that ignores SIGTERM")
    args, _ = parser.parse_known_args(argv)
    if args.child:
        subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                                "signal.SIG_IGN); time.sleep(600)"])

    async def completions(request):
        if args.api_key and request.headers.get("Authorization") != f"Bearer {args.api_key}":
            return web.json_response({"error": {"message": "bad key", "code": 401}}, status=401)
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(body["max_tokens"]):
            await response.write(b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n')
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return response

    async def ok(request):
        return web.json_response({"data": [{"id": args.served_model_name}]})

    app = web.Application()
    app.add_routes([web.get("/health", ok), web.get("/v1/models", ok), web.post("/v1/completions", completions)])
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    _standin(sys.argv[1:])
