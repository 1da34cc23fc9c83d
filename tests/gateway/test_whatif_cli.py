"""`pdmesh what-if` on traces in each published format, as tables and JSON, and bad input
with a message and exit code 2. Offline: no gateway, no Ray."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from gateway.cli import main

ROWS = [(float(i), 2000, 20) for i in range(300)]  # a request a second of long prompts: prompt-heavy


def burstgpt(path):
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n" + "".join(
        f"{t},ChatGPT,{p},{o},{p + o},Conversation log\n" for t, p, o in ROWS))


def azure(path):
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:{int(t) // 60:02d}:{t % 60:010.7f},{p},{o}\n" for t, p, o in ROWS))


def mooncake(path):
    path.write_text("".join(json.dumps({"timestamp": int(t * 1000), "input_length": p, "output_length": o,
                                        "hash_ids": []}) + "\n" for t, p, o in ROWS))


def pdmesh(*args: str):
    result = CliRunner().invoke(main, ["what-if", *args], env={"COLUMNS": "200"}, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "scenarios.yaml"
    path.write_text(yaml.safe_dump({"scenarios": [
        {"name": "chat", "model": "m", "slo": {"ttft_s": 2.0, "tpot_s": 0.1}, "prefill": 1, "decode": 3,
         "limits": {"prefill": {"min": 1, "max": 3}, "decode": {"min": 1, "max": 3}}},
        {"name": "code", "model": "m", "slo": {"ttft_s": 1.0, "tpot_s": 0.1}}]}))
    return path


@pytest.mark.parametrize("write", [burstgpt, azure, mooncake])
def test_more_prefill_meets_a_prompt_heavy_trace(tmp_path, config, write):
    trace = tmp_path / "trace"
    write(trace)
    code, out, err = pdmesh("--trace", str(trace), "--ratio", "1:3", "--ratio", "3:1", "--config", str(config),
                            "--scenario", "chat", "--output", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["trace"]["requests"] == len(ROWS) and data["trace"]["kind"] == write.__name__
    poor, good = data["predictions"]
    assert (poor["prefill"], good["prefill"]) == (1, 3)
    assert good["slo_attainment"] > poor["slo_attainment"] and good["served_rps"] >= poor["served_rps"]
    assert data["controller_split"]["4"]["prefill"] == 3


def test_table(tmp_path):
    trace = tmp_path / "trace.csv"
    burstgpt(trace)
    code, out, err = pdmesh("--trace", str(trace), "--ratio", "2:2", "--ttft-s", "1.5")
    assert code == 0, err
    assert "what-if" in out and "2:2" in out and "TTFT <= 1.5 s" in out and "the controller would split 4" in out


@pytest.mark.parametrize("args, message", [
    (("--ratio", "0:4"), "'chat''s limits [1, 3]"),
    (("--ratio", "2:x"), "expected PREFILL:DECODE counts"),
    (("--ratio", "2:2", "--scenario", "nope"), "unknown scenario 'nope'"),
    (("--ratio", "2:2", "--scenario", None), "several scenarios: pick one with --scenario"),
    (("--ratio", "2:2", "--profile", "nope"), "no built-in profile 'nope'"),
    (("--ratio", "2:2", "--trace", "missing.csv"), "cannot read trace missing.csv"),
    (("--ratio", "2:2", "--trace", "bad"), "unknown trace format"),
])
def test_bad_input(tmp_path, config, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    burstgpt(tmp_path / "trace.csv")
    (tmp_path / "bad").write_text("a,b\n1,2\n")
    options = {"--trace": "trace.csv", "--config": str(config), "--scenario": "chat"}
    rest = list(args)
    for flag in list(options):
        if flag in rest:
            value = rest[rest.index(flag) + 1]
            del rest[rest.index(flag):rest.index(flag) + 2]
            if value is None:
                del options[flag]
            else:
                options[flag] = value
    code, out, err = pdmesh(*[x for kv in options.items() for x in kv], *rest)
    assert code == 2, (out, err)
    assert message in err
