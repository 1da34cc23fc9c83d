"""Actor loss through the gateway, with the real `openai` client: a stream on the default
1P:1D mesh goes on when its prefill or its decode actor is killed at a named point
(mesh.faults), and streams every token exactly once, as one engine alone makes them. With
the only decode actor dead the request waits for its replacement; the retry is admitted
although its admission timeout (0.5 s here) passed while the replacement started."""
from __future__ import annotations


import openai
import pytest

from mesh.faults import read_log
from tests.gateway.support import API_KEY, assert_no_blocks_held, serving, tiny_config
from tests.mesh.support import replaced

FAULTS = ";".join(["kill:prefill@request=fo-prefill", "kill:transfer_after_layers=1@request=fo-transfer",
                   "kill:decode_step=4@request=fo-decode"])
PROMPT = list(range(20, 60))
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def fault_log(tmp_path_factory):
    return str(tmp_path_factory.mktemp("failover") / "fired.jsonl")


@pytest.fixture(scope="module")
def failover(checkpoint, ray_cluster, fault_log):
    """A gateway of its own (1 prefill + 1 decode actor) whose actors carry the faults above,
    handed over as `pdmesh serve` hands them: by PDMESH_FAULT in the gateway's environment."""
    from gateway.config import Limits

    config = tiny_config(checkpoint, Limits(admission_timeout_s=0.5))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PDMESH_FAULT", FAULTS)
        env.setenv("PDMESH_FAULT_LOG", fault_log)
        gateway = serving(config)
        running = gateway.__enter__()  # the pools read the faults when made: nothing else here may
    try:
        yield running
    finally:
        gateway.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(failover):
    with openai.OpenAI(base_url=failover.http_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.mark.parametrize("rid, point", [("fo-prefill", "prefill"), ("fo-transfer", "transfer_after_layers"),
                                        ("fo-decode", "decode_step")])
def test_a_stream_survives_a_killed_actor(client, failover, reference, fault_log, rid, point):
    model = client.models.list().data[0].id
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True,
                                            logprobs=1, temperature=0,
                                            extra_body={"ignore_eos": True, "request_id": rid,
                                                        "return_tokens_as_token_ids": True}))
    tokens = [int(t.removeprefix("token_id:")) for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.tokens]
    assert tokens == reference(PROMPT, MAX_TOKENS)  # every token once, none lost, none repeated
    assert chunks[-1].choices[0].finish_reason == "length"
    [hit] = [f for f in read_log(fault_log) if f.request == rid]
    assert hit.point == point
    pool = failover.gateway.fleet.scenarios["default"].pool
    failover.run(replaced(pool, hit.actor))
    assert_no_blocks_held(failover)
