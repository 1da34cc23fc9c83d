"""`pdmesh status` and the ops CLI's output on the shared gateway: whole cells at 80 columns,
`-o wide|json|yaml`, JSON of consistent types (checked against a schema), `--watch`, actors
that Ray cannot place (pending, with what they wait for), and the audit line of each change."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.gateway.support import ADMIN_KEY, ok_json

_COUNT = {"type": "integer", "minimum": 0}
_TEXT = {"type": ["string", "null"], "minLength": 1}  # never "": absent is null
_MODE = {"enum": ["disaggregated", "aggregated", "auto"]}
_LIMITS = {"type": "object", "required": ["min", "max"], "properties": {"min": _COUNT, "max": _COUNT}}
STATUS_SCHEMA = {
    "type": "object", "required": ["scenarios", "pools"],
    "properties": {
        "scenarios": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["scenario", "enabled", "pinned", "prefill", "decode", "target_prefill", "target_decode",
                         "prefill_limits", "decode_limits", "observed", "mode", "configured_mode", "switching",
                         "both"],
            "properties": {
                "scenario": {"type": "string", "minLength": 1}, "enabled": {"type": "boolean"},
                "mode": _MODE, "configured_mode": _MODE, "switching": {"type": "boolean"}, "both": _COUNT,
                "pinned": {"type": "boolean"}, "prefill": _COUNT, "decode": _COUNT, "target_prefill": _COUNT,
                "target_decode": _COUNT, "prefill_limits": _LIMITS, "decode_limits": _LIMITS,
                "observed": {"type": "object", "properties": {
                    "arrival_rps": {"type": "number"}, "requests_ended": _COUNT,
                    "ttft_attainment": {"type": ["number", "null"]},
                    "tpot_attainment": {"type": ["number", "null"]}}}}}},
        "pools": {"type": "array", "items": {
            "type": "object", "required": ["scenario", "model", "actors"],
            "properties": {"actors": {"type": "array", "items": {
                "type": "object",
                "required": ["actor_id", "scenario", "role", "state", "pid", "node", "device", "model", "load",
                             "waiting_for"],
                "properties": {
                    "actor_id": {"type": "string", "minLength": 1},
                    "role": {"enum": ["prefill", "decode", "both"]},
                    "state": {"enum": ["pending", "starting", "serving", "draining", "dead"]},
                    "pid": {"type": ["integer", "null"]}, "node": _TEXT, "device": _TEXT, "model": _TEXT,
                    "waiting_for": _TEXT,
                    "load": {"type": "object", "additionalProperties": {"type": "number"}, "properties": {
                        name: _COUNT for name in ("queued_prompt_tokens", "queued_requests", "active_requests",
                                                  "free_blocks", "num_blocks")}}}}}}}}}}


def _actors(data: dict) -> list[dict]:
    return [a for pool in data["pools"] for a in pool["actors"]]


def test_status_fits_80_columns_with_whole_actor_ids(pdmesh):
    code, out, err = pdmesh("status", columns=80)
    assert code == 0, err
    assert all(len(line) <= 80 for line in out.splitlines()), out
    words = out.split()
    for actor in _actors(ok_json(pdmesh, "status")):
        assert actor["actor_id"] in words
    assert "disaggregated" in words  # the mode stays; optional columns (the limits first) give way
    assert "…" not in out and "NODE" not in out
    code, out, err = pdmesh("status", columns=120)
    assert code == 0, err
    assert "1000000" not in out and "1-∞/1-∞" in out  # the scenario's limits: no maximum


def test_status_wide_shows_node_pid_and_device(pdmesh):
    code, out, err = pdmesh("status", "-o", "wide", columns=200)
    assert code == 0, err
    assert "NODE" in out and "PID" in out and "DEVICE" in out
    for actor in _actors(ok_json(pdmesh, "status")):
        assert actor["node"] == "127.0.0.1" and actor["device"] == "cpu"  # the node's IP, not Ray's node id
        assert str(actor["pid"]) in out.split()


def test_status_json_and_yaml_have_consistent_types(pdmesh):
    data = ok_json(pdmesh, "status")
    jsonschema.validate(data, STATUS_SCHEMA)
    code, out, err = pdmesh("status", "-o", "yaml")
    assert code == 0, err
    jsonschema.validate(yaml.safe_load(out), STATUS_SCHEMA)


def test_watch_prints_one_json_object_a_line(gateway, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PDMESH_HOME": str(tmp_path),
           "PDMESH_ADDRESS": gateway.grpc_address, "PDMESH_ADMIN_KEY": ADMIN_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "status", "-o", "json", "--watch", "0.1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first, second = json.loads(proc.stdout.readline()), json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert second["time_unix"] > first["time_unix"]
    jsonschema.validate(second, STATUS_SCHEMA)


@pytest.fixture
def unplaceable(restored, pdmesh):
    """The shared gateway's decode actors ask for a Ray resource no node has, for this test;
    the pending actors it leaves are removed after it."""
    pool = restored.gateway.fleet.scenarios["default"].pool
    hardware = pool.spec.hardware["decode"]
    pool.spec.hardware["decode"] = hardware.model_copy(update={"resources": {"pdmesh_test_absent": 1}})
    yield pool
    pool.spec.hardware["decode"] = hardware
    for actor in _actors(ok_json(pdmesh, "status")):
        if actor["state"] == "pending":
            pdmesh("remove", actor["actor_id"])


def test_add_without_a_node_answers_pending_at_once_and_remove_cancels_it(pdmesh, unplaceable):
    added = ok_json(pdmesh, "add", "default", "decode")
    assert added["state"] == "pending"
    assert added["waiting_for"] == "pdmesh_test_absent 1 (at most 0 free on a node)"
    code, out, _ = pdmesh("status")
    assert f"{added['actor_id']} is pending: no node has pdmesh_test_absent 1 (at most 0 free on a node) free" in out
    [listed] = [a for a in _actors(ok_json(pdmesh, "status")) if a["actor_id"] == added["actor_id"]]
    assert listed["state"] == "pending" and listed["pid"] is None
    code, out, err = pdmesh("add", "default", "decode", "--wait", "--timeout", "1")
    assert code == 1 and "is still pending after 1 s (--timeout): no node has pdmesh_test_absent 1" in err
    pending = [a["actor_id"] for a in _actors(ok_json(pdmesh, "status")) if a["state"] == "pending"]
    assert len(pending) == 2
    for actor_id in pending:
        assert ok_json(pdmesh, "remove", actor_id) == {"actor_id": actor_id}
    assert not [a for a in _actors(ok_json(pdmesh, "status")) if a["state"] == "pending"]
    assert not unplaceable.offline


def test_each_change_logs_one_audit_line(pdmesh, caplog):
    caplog.set_level(logging.INFO, logger="pdmesh.audit")
    prefill = next(a for a in _actors(ok_json(pdmesh, "status")) if a["role"] == "prefill")
    added = ok_json(pdmesh, "add", "default", "decode")["actor_id"]
    for args in (("drain", added), ("flip", added, "decode"), ("remove", added), ("ratio", "set", "default", "1:1"),
                 ("ratio", "auto", "default"), ("controller", "off"), ("controller", "on", "default"),
                 ("remove", prefill["actor_id"])):
        pdmesh(*args)
    ok_json(pdmesh, "status")  # reading changes nothing: no line
    lines = [r.getMessage() for r in caplog.records if r.name == "pdmesh.audit"]
    who = "admin key 1 from ipv4:127.0.0.1:"
    assert all(line.startswith(who) for line in lines), lines
    assert [line.split(": ", 1)[1] for line in lines] == [
        "add a decode actor to default: done", f"drain {added}: done", f"flip {added} to decode: done",
        f"remove {added}: done", "ratio set 1:1 default: done", "ratio auto default: done",
        "controller off (every scenario): done", "controller on default: done",
        f"remove {prefill['actor_id']}: refused (failed_precondition: cannot remove {prefill['actor_id']}: scenario "
        "'default' would have 0 serving prefill actor(s), below its minimum of 1 (limits.prefill.min in its scenario "
        "file): start another prefill actor first (`pdmesh add default prefill`), or lower limits.prefill.min; or "
        "force it (--force))"]


def _actor(actor_id: str, role: str, **changes) -> dict:
    load = {"queued_prompt_tokens": 0, "queued_requests": 0, "active_requests": 0, "free_blocks": 100,
            "num_blocks": 128, "prefill_tokens_per_s": 0.0, "decode_step_s": 0.0}
    return {"actor_id": actor_id, "scenario": "s", "role": role, "state": "serving", "pid": 42, "node": "10.0.0.7",
            "device": "cuda:0", "model": "/m", "load": load, "waiting_for": None, **changes}


def test_columns_drop_before_they_cut_and_every_role_shows(monkeypatch):
    from gateway.ops import _actor_rows

    monkeypatch.setenv("COLUMNS", "80")
    pools = [{"scenario": "s", "actors": [
        _actor("a-scenario-with-a-rather-long-name-and-more-b12", "both"),
        _actor("a-scenario-with-a-rather-long-name-and-more-p13", "prefill", state="pending", pid=None,
               node=None, device=None, waiting_for="GPU 1 (at most 0 free on a node)")]}]
    table = _actor_rows(pools)
    lines = table.splitlines()
    assert lines[0].split() == ["ACTOR", "ROLE", "STATE", "QUEUED"]  # KV USED and RUNNING went: 80 columns
    assert lines[1].split() == ["a-scenario-with-a-rather-long-name-and-more-b12", "both", "serving", "0"]
    assert lines[3] == ("a-scenario-with-a-rather-long-name-and-more-p13 is pending: no node has GPU 1 "
                        "(at most 0 free on a node) free")
    assert all(len(line) <= 80 for line in lines[:3])
    wide = _actor_rows(pools, wide=True).splitlines()
    assert wide[1].split()[-4:] == ["28/128", "10.0.0.7", "42", "cuda:0"] and wide[2].split()[-3:] == ["-"] * 3


def test_a_refusal_that_says_what_to_do_is_not_repeated():
    import grpc

    from gateway.ops_client import AUTH, Target, _translate

    class Refused(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, details: str):
            self.code, self.details = (lambda: code), (lambda: details)

    off = "the admin service is off: start the gateway with an admin key (--admin-key-file or PDMESH_ADMIN_KEY)"
    error = _translate(Refused(grpc.StatusCode.PERMISSION_DENIED, off), Target("h:1", None))
    assert (error.message, error.exit_code) == (f"the gateway refused: {off}", AUTH)
    error = _translate(Refused(grpc.StatusCode.UNAUTHENTICATED, "wrong admin key"), Target("h:1", "k"))
    assert error.message.startswith("the gateway refused the admin key: wrong admin key (pass the gateway's admin key")
    assert "local credential" in error.message and error.exit_code == AUTH
