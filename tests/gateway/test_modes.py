"""Serving modes through a real gateway: an auto scenario's conditional choice lands on the
request's span and in pdmesh:placements_total, and an aggregated scenario serves from one
both actor, which the status lists (with the mode) and whose missing ratio cannot be pinned;
its actors flip to both and no other role. (tests/gateway/test_mode_switch_live.py: the
controller switching a scenario's mode.)"""
from __future__ import annotations

import time

import grpc
import pytest

from gateway.proto import admin_pb2 as pb
from gateway.proto import admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.gateway.support import ADMIN, API_KEY, ENGINE, cli, first_json, http, ok_json, serving

TRACE_ID = "5c0ffee5c0ffee5c0ffee5c0ffee5c0f"


def config(checkpoint, **scenario):
    from gateway.config import parse

    return parse({"scenarios": [{"name": "s", "model": str(checkpoint("llama", "float32")),
                                 "slo": {"ttft_s": 5.0, "tpot_s": 0.5}, **scenario}],
                  # a lease outlasts a slow prefill on a loaded host
                  "engine": ENGINE, "transport": {"lease_ttl_s": 10.0, "timeout_s": 5.0},
                  "controller": {"enabled": False}})


def generate(running, token_ids, metadata=()):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(running.grpc_address))
    request = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=token_ids),
                                            sampling=inference_pb2.SamplingOptions(max_tokens=4, temperature=0,
                                                                                   ignore_eos=True))
    return [c for c in stub.Generate(request, metadata=(("authorization", f"Bearer {API_KEY}"), *metadata),
                                     timeout=60)]


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def placements(running) -> list[str]:
    status, body = http(running, "/metrics")
    assert status == 200
    return sorted(line for line in body.decode().splitlines() if line.startswith("pdmesh:placements_total{"))


def test_auto_puts_its_choice_on_the_span_and_in_the_metric(checkpoint, ray_cluster, otlp, reference):
    short, long = [5] * 4, [3 + i % 50 for i in range(40)]
    with serving(config(checkpoint, mode="auto", local_prefill_tokens=8)) as running:
        traceparent = (("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),)
        assert tokens(generate(running, short, traceparent)) == reference(short, 4)
        assert tokens(generate(running, long)) == reference(long, 4)
        assert placements(running) == ['pdmesh:placements_total{decision="local",scenario="s"} 1.0',
                                       'pdmesh:placements_total{decision="remote",scenario="s"} 1.0']
    deadline = time.monotonic() + 60
    while True:
        spans = {s.name: s for _, s in otlp.of_trace(bytes.fromhex(TRACE_ID))}
        if {"gateway.generate", "generate"} <= spans.keys() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    [event] = [e for e in spans["gateway.generate"].events if e.name == "placement"]
    attributes = {a.key: a.value.string_value for a in event.attributes}
    assert attributes["mode"] == "auto" and attributes["decision"] == "local"
    assert attributes["reason"].startswith("short prompt: 4 uncached tokens")
    actor = {a.key: a.value.string_value for a in spans["generate"].attributes}["pdmesh.actor"]
    assert actor.startswith("s-d")  # the whole request ran on the decode actor
    assert "prefill" not in spans


@pytest.fixture(scope="module")
def aggregated(checkpoint, ray_cluster):
    with serving(config(checkpoint, mode="aggregated")) as running:
        yield running


def test_an_aggregated_scenario_serves_from_one_both_actor_with_no_ratio_to_pin(aggregated, reference):
    running = aggregated
    assert tokens(generate(running, [5] * 12)) == reference([5] * 12, 4)  # the engine's alone
    with grpc.insecure_channel(running.grpc_address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        [pool] = admin.ListPools(pb.ListPoolsRequest(), metadata=ADMIN, timeout=30).pools
        assert [(a.role, a.state) for a in pool.actors] == [("both", "serving")]
        with pytest.raises(grpc.RpcError) as refused:
            admin.SetRatio(pb.SetRatioRequest(scenario="s", prefill=1, decode=1), metadata=ADMIN, timeout=30)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "scenario 's' is aggregated" in refused.value.details()
    assert placements(running) == []  # no conditional choice outside auto
    running.run(running.gateway.control.tick())  # a controller round leaves it alone
    assert [(a.role, a.state) for a in running.gateway.fleet.actor_infos()["s"]] == [("both", "serving")]


def test_status_shows_the_mode_and_flips_keep_to_both(aggregated, reference, tmp_path):
    """A drained both actor serves again by a flip to both, another both actor can be added,
    and prefill or decode are refused, with what to change instead."""
    def pdmesh(*args):
        return cli(aggregated, tmp_path, *args)

    code, out, err = pdmesh("status")
    assert code == 0, err
    assert "aggregated" in out and "0:0 +1 both" in out
    [scenario] = ok_json(pdmesh, "status")["scenarios"]
    assert (scenario["mode"], scenario["configured_mode"], scenario["both"]) == ("aggregated", "aggregated", 1)
    [actor] = ok_json(pdmesh, "status")["pools"][0]["actors"]
    for args, what in [(("flip", actor["actor_id"], "decode"), f"flip {actor['actor_id']} to decode"),
                       (("add", "s", "prefill"), "add a prefill actor to s")]:
        code, out, err = pdmesh(*args, "--output", "json")
        assert code == 1, out
        assert err == (f"pdmesh: error: cannot {what}: scenario 's' is aggregated, its actors serving as both; use "
                       "both, or set mode: auto or disaggregated in its scenario file\n")
        assert first_json(out)["error"]["status"] == "FAILED_PRECONDITION"
    assert ok_json(pdmesh, "drain", actor["actor_id"])["actor"]["state"] == "draining"
    assert aggregated.gateway.fleet.not_ready() == ["scenario 's' has no serving both actor"]
    flipped = ok_json(pdmesh, "flip", actor["actor_id"], "both")
    assert (flipped["role"], flipped["state"]) == ("both", "serving")
    added = ok_json(pdmesh, "add", "s", "both")
    assert (added["role"], added["state"]) == ("both", "serving")
    assert ok_json(pdmesh, "status")["scenarios"][0]["both"] == 2
    assert tokens(generate(aggregated, [3] * 12)) == reference([3] * 12, 4)
    ok_json(pdmesh, "remove", added["actor_id"])
    assert [(a.role, a.state) for a in aggregated.gateway.fleet.actor_infos()["s"]] == [("both", "serving")]
