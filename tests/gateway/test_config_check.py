"""`pdmesh config validate` and `pdmesh config schema`: every bad field with its line and a
"did you mean", exit 2; the example configs in deploy/ pass, and match the schema."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from gateway.cli import main

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
EXAMPLES = sorted((DEPLOY / "configs").glob("*.yaml")) + [DEPLOY / "k8s" / "scenarios.yaml"]

BAD = """\
scenarios:
  - name: chat
    model: /models/x
    slo: {ttft_s: 2.0, tpot_sec: 0.1}
    hardware:
      prefil: {accelerator: cpu}
    prefill: 1
    decode: -1
engine:
  kv_cache_gbs: 1
  dtype: float31
transport:
  backend: ucxx
  timout_s: 3
gateway:
  max_forward: 3
controler: {}
"""


def _run(*args: str):
    result = CliRunner().invoke(main, ["config", *args])
    return result.exit_code, result.stdout, result.stderr


def test_every_bad_field_with_its_line_and_what_was_meant(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    code, out, err = _run("validate", str(path))
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"{path}:{line}" for line in (
        "4: scenarios.0.slo.tpot_s: required, and missing",
        "4: scenarios.0.slo.tpot_sec: unknown field (did you mean 'tpot_s'?)",
        "6: scenarios.0.hardware.prefil: Input should be 'prefill', 'decode' or 'both' (did you mean 'prefill'?)",
        "8: scenarios.0.decode: Input should be greater than or equal to 0",
        "10: engine.kv_cache_gbs: unknown field (did you mean 'kv_cache_gb'?)",
        "11: engine.dtype: 'float31' is not one of auto, float32, bfloat16, float16 (did you mean 'float32'?)",
        "13: transport: unknown transport backend 'ucxx'; choose one of ucx, tcp, local",
        "14: transport.timout_s: unknown field (did you mean 'timeout_s'?)",
        "16: gateway.max_forward: unknown field (did you mean 'max_forwards'?)",
        "17: controler: unknown field (did you mean 'controller'?)")] + [f"pdmesh: error: {path}: 10 problem(s)"]


@pytest.mark.parametrize("text, message", [
    ("scenarios: [\n  {name: a\n", ":3: not valid YAML: "),
    ("- 1\n", ":1: expected a mapping with a non-empty list under 'scenarios:'"),
    (yaml.safe_dump({"scenarios": [{"name": "a", "model": "m", "slo": {"ttft_s": 1, "tpot_s": 1}}] * 2}),
     ":1: scenario names must be unique; repeated: a"),  # the loader's own check, across scenarios
])
def test_what_only_the_whole_file_shows(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code, _, err = _run("validate", str(path))
    assert code == 2 and message in err.splitlines()[0], err


def test_controller_settings_that_would_break_its_plans_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"scenarios": [{"name": "a", "model": "m", "slo": {"ttft_s": 1, "tpot_s": 1}}],
                                    "controller": {"settings": {"utilisation": 0, "sqrt_from": -1}}}))
    code, _, err = _run("validate", str(path))
    assert code == 2 and "utilisation must be in (0, 1], sqrt_from > 0" in err, err


def test_an_autoscaler_correction_that_would_not_fall_back_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"scenarios": [{"name": "a", "model": "m", "slo": {"ttft_s": 1, "tpot_s": 1}}],
                                    "controller": {"autoscale": {"correct_down": 1.5}}}))
    code, _, err = _run("validate", str(path))
    assert code == 2 and "correct_down in (0, 1]" in err, err


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_example_configs_pass_and_match_the_schema(path):
    code, out, err = _run("validate", str(path))
    assert code == 0, err
    assert out.startswith(f"{path}: OK (") and len(out.splitlines()) == 1
    code, out, _ = _run("schema")
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(out))


def test_the_schema_covers_engine_and_transport_and_refuses_typos():
    code, out, _ = _run("schema")
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "pdmesh serve config"
    assert "kv_cache_gb" in schema["properties"]["engine"]["properties"]
    assert "model" not in schema["properties"]["engine"]["properties"]  # each scenario's
    assert "secret" not in schema["properties"]["transport"]["properties"]  # made per run
    with pytest.raises(jsonschema.ValidationError, match="kv_cache_gbs"):
        jsonschema.validate(yaml.safe_load(BAD.replace("tpot_sec", "tpot_s")), schema)
