"""The ops CLI through the real admin API of a real gateway (the session's: one scenario, 1
prefill + 1 decode actor, the ratio controller off): tables, JSON, every command, bad input
answered with a clear message and its exit code, the role limits (--force warns), and dead
actors answered in one line."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.gateway.support import ADMIN_KEY, API_KEY, kill, ok_json, replacement_of


def test_status_tables_and_json(pdmesh):
    code, out, err = pdmesh("status")
    assert code == 0, err
    assert "default" in out and "prefill" in out and "decode" in out and "TTFT MET" in out
    assert "MODE" in out and "disaggregated" in out
    data = ok_json(pdmesh, "status")
    [scenario] = data["scenarios"]
    assert (scenario["scenario"], scenario["prefill"], scenario["decode"], scenario["both"]) == ("default", 1, 1, 0)
    assert (scenario["mode"], scenario["configured_mode"], scenario["switching"]) == ("disaggregated",) * 2 + (False,)
    assert scenario["observed"]["ttft_target_s"] == 2.0
    actors = data["pools"][0]["actors"]
    assert sorted(a["role"] for a in actors) == ["decode", "prefill"]
    assert all(a["pid"] > 0 and a["state"] == "serving" and a["device"] == "cpu" for a in actors)


def test_ratio_pin_then_auto_then_controller_off(pdmesh):
    pinned = ok_json(pdmesh, "ratio", "set", "default", "1:1")["scenarios"][0]
    assert pinned["pinned"] and (pinned["target_prefill"], pinned["target_decode"]) == (1, 1)
    auto = ok_json(pdmesh, "ratio", "auto", "default")["scenarios"][0]
    assert not auto["pinned"] and auto["enabled"]
    off = ok_json(pdmesh, "controller", "off")["scenarios"][0]
    assert not off["enabled"]
    code, out, _ = pdmesh("ratio", "show")
    assert code == 0 and "auto,off" in out


def test_actor_lifecycle_add_drain_flip_remove(pdmesh):
    added = ok_json(pdmesh, "add", "default", "decode")
    assert added["role"] == "decode" and added["state"] == "serving"
    drained = ok_json(pdmesh, "drain", added["actor_id"])
    assert drained["actor"]["state"] == "draining" and drained["moved_request_ids"] == []
    flipped = ok_json(pdmesh, "flip", added["actor_id"], "decode")
    assert flipped["state"] == "serving"
    assert ok_json(pdmesh, "remove", added["actor_id"]) == {"actor_id": added["actor_id"]}
    roles = [a["role"] for a in ok_json(pdmesh, "status")["pools"][0]["actors"]]
    assert sorted(roles) == ["decode", "prefill"]


def test_decisions_table_and_json(pdmesh):
    assert ok_json(pdmesh, "decisions", "--scenario", "default") == {"decisions": []}
    code, out, _ = pdmesh("decisions")
    assert code == 0 and "ratio controller decisions" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, key, exit_code, message", [
    (("ratio", "show", "nope"), ADMIN_KEY, 2, "unknown scenario 'nope'; the gateway serves: default"),
    (("ratio", "set", "nope", "1:1"), ADMIN_KEY, 2, "unknown scenario 'nope'"),
    (("ratio", "set", "default", "0:2"), ADMIN_KEY, 2, "prefill 0 is outside scenario 'default''s limits [1, "),
    (("ratio", "set", "default", "0:0"), ADMIN_KEY, 2, "a ratio needs at least one actor"),
    (("ratio", "set", "default", "3-1"), ADMIN_KEY, 2, "expected PREFILL:DECODE counts, like 3:1"),
    (("add", "nope", "decode"), ADMIN_KEY, 2, "unknown scenario 'nope'"),
    (("flip", "ghost", "decode"), ADMIN_KEY, 2, "no actor 'ghost'"),
    (("flip", "ghost", "all"), ADMIN_KEY, 2, "'all' is not one of 'prefill', 'decode', 'both'"),
    (("decisions", "--scenario", "nope"), ADMIN_KEY, 2, "unknown scenario 'nope'"),
    (("status",), "wrong-key", 3, "the gateway refused the admin key"),
    (("status",), API_KEY, 3, "the gateway refused the admin key"),
    (("status",), None, 3, "--admin-key, --admin-key-file or PDMESH_ADMIN_KEY"),
])
def test_bad_input_has_a_message_and_an_exit_code(pdmesh, args, key, exit_code, message):
    code, out, err = pdmesh(*args, key=key)
    assert code == exit_code, (out, err)
    assert message in err


def test_last_prefill_actor_cannot_be_removed(pdmesh):
    prefill = next(a for a in ok_json(pdmesh, "status")["pools"][0]["actors"] if a["role"] == "prefill")
    code, out, err = pdmesh("remove", prefill["actor_id"], "--output", "json")
    assert code == 1 and "would have 0 serving prefill actor(s), below its minimum of 1" in err
    assert json.loads(out)["error"]["status"] == "FAILED_PRECONDITION"


def _only(pdmesh, role: str) -> dict:
    [actor] = [a for a in ok_json(pdmesh, "status")["pools"][0]["actors"] if a["role"] == role]
    return actor


@pytest.mark.parametrize("command, what", [(("flip", "{id}", "prefill"), "flip {id} to prefill"),
                                           (("drain", "{id}"), "drain {id}"), (("remove", "{id}"), "remove {id}")])
def test_the_only_decode_actor_stays_unless_forced(pdmesh, command, what):
    decode = _only(pdmesh, "decode")
    code, out, err = pdmesh(*(arg.format(id=decode["actor_id"]) for arg in command))
    assert code == 1, out
    assert err == (f"pdmesh: error: cannot {what.format(id=decode['actor_id'])}: scenario 'default' would have 0 serving decode actor(s), below its minimum of 1 "
                   f"(limits.decode.min in its scenario file): start another decode actor first (`pdmesh add default "
                   f"decode`), or lower limits.decode.min; or force it (--force)\n")
    assert _only(pdmesh, "decode")["state"] == "serving"


@pytest.mark.parametrize("command, what", [(("flip", "{id}", "both"), "flip {id} to both"),
                                           (("add", "default", "both"), "add a both actor to default")])
def test_both_is_refused_in_a_disaggregated_scenario_even_forced(pdmesh, command, what):
    decode = _only(pdmesh, "decode")
    code, out, err = pdmesh(*(arg.format(id=decode["actor_id"]) for arg in command), "--force", "--output", "json")
    assert code == 1, out
    assert err == (f"pdmesh: error: cannot {what.format(id=decode['actor_id'])}: scenario 'default' is disaggregated, "
                   "its actors serving as prefill or decode; use prefill or decode, or set mode: aggregated or auto "
                   "in its scenario file\n")
    assert json.loads(out)["error"]["status"] == "FAILED_PRECONDITION"
    assert _only(pdmesh, "decode")["state"] == "serving"


def test_force_flips_the_only_decode_actor_with_a_warning(pdmesh):
    decode = _only(pdmesh, "decode")
    code, out, err = pdmesh("flip", decode["actor_id"], "prefill", "--force", "--output", "json")
    assert code == 0, err
    assert json.loads(out)["role"] == "prefill"
    assert err.startswith(f"pdmesh: warning: forced to flip {decode['actor_id']} to prefill: scenario 'default' "
                          "would have 0 serving decode actor(s)")
    code, out, err = pdmesh("flip", decode["actor_id"], "decode")
    assert (code, err) == (0, "")
    assert f"{decode['actor_id']} (default): decode, serving" in out


def _actor_ids(pdmesh) -> set[str]:
    return {a["actor_id"] for a in ok_json(pdmesh, "status")["pools"][0]["actors"]}


def test_a_dead_actor_answers_in_one_line(pdmesh, gateway):
    original = _actor_ids(pdmesh)
    added = ok_json(pdmesh, "add", "default", "decode")
    kill(gateway.gateway.fleet.scenarios["default"].pool.members[added["actor_id"]].handle)
    code, _, err = pdmesh("flip", added["actor_id"], "prefill")
    assert code in (1, 2)  # 2: the pool's supervisor has dropped the dead actor already
    assert err in (f"pdmesh: error: actor {added['actor_id']} is dead: nothing was changed (`pdmesh status` lists "
                   "the pool's actors)\n", f"pdmesh: error: no actor {added['actor_id']!r}; `pdmesh status` lists "
                   "the actors\n")
    ok_json(pdmesh, "remove", replacement_of(gateway, added["actor_id"]))  # the supervisor replaced it
    assert _actor_ids(pdmesh) == original


def test_unreachable_gateway(pdmesh):
    code, out, err = pdmesh("status", "--address", f"127.0.0.1:{_free_port()}", "--timeout", "0.5", "--output",
                            "json")
    assert code == 4 and "cannot reach the gateway at 127.0.0.1:" in err
    assert json.loads(out)["error"]["exit_code"] == 4


def test_console_script_with_the_environment(gateway):
    """As operators run it: its own process, the address and key from the environment."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "PDMESH_ADDRESS": gateway.grpc_address, "PDMESH_ADMIN_KEY": ADMIN_KEY}
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "ratio", "show", "--output", "json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["scenarios"][0]["scenario"] == "default"
    env["PDMESH_ADMIN_KEY"] = "wrong"
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "status"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3 and "refused the admin key" in done.stderr
