"""The gateway's plain policies without Ray or a network: forward on rejection (also driven
through the dispatcher with scripted actors), scenario routing, deadlines, the in-flight
bound, API keys and OpenAI bodies."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from gateway.auth import Keys
from gateway.errors import GatewayError
from gateway.openai_schema import ChatBody, CompletionBody, parse
from gateway.router import Deadlines, InFlightLimit, RequestFacts, ScenarioRouter
from mesh.api import ActorReport, ActorRequest, ActorState, LoadReport, OfferReply, Role, SamplingParams
from mesh.errors import MeshError
from mesh.routing import ForwardOnRejection
from scenarios.spec import parse_specs
from tests.support.clock import FakeClock


def test_policies_import_without_ray_or_grpc():
    code = ("import sys, mesh.api, mesh.routing, gateway.cli, gateway.router, gateway.errors; "
            "print(sorted(m for m in ('ray', 'grpc', 'torch') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_the_mesh_package_has_every_name_it_exports():
    import mesh

    assert [name for name in mesh.__all__ if getattr(mesh, name, None) is None] == []
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        mesh.Nope


@dataclass
class Actor:
    actor_id: str
    queued: int = 0
    free: int = 0
    replies: list = field(default_factory=list)  # what successive offers answer
    offers: int = 0

    @property
    def info(self) -> ActorReport:
        return ActorReport(self.actor_id, "s", Role.PREFILL, ActorState.SERVING,
                           load=LoadReport(self.queued * 10, self.queued, free_blocks=self.free))


def test_forward_on_rejection_orders_idle_first_and_bounds_offers():
    policy = ForwardOnRejection(max_forwards=3, min_retry_pause_s=0.05)
    busy, idle, mid = Actor("busy", queued=5, free=1), Actor("idle", free=50), Actor("mid", queued=1, free=9)
    assert [a.actor_id for a in policy.prefill_order([busy, idle, mid])] == ["idle", "mid", "busy"]
    assert [a.actor_id for a in policy.decode_order([busy, idle, mid])] == ["idle", "mid", "busy"]
    assert policy.may_offer(2, 1.0) and not policy.may_offer(3, 1.0) and not policy.may_offer(0, 0.0)
    assert policy.pause_s(None, 1.0) == 0.05 and policy.pause_s(0.3, 1.0) == 0.3 and policy.pause_s(0.3, 0.1) == 0.1
    e = policy.give_up(3, 0.2)
    assert (e.code, e.retry_after_s) == ("resource_exhausted", 0.2) and "3 offers" in e.message
    assert policy.give_up(0, None).code == "deadline_exceeded"


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    async def remote(self, *args):
        return self.fn(*args)


class _Handle:
    def __init__(self, actor: Actor):
        def offer(*_):
            actor.offers += 1
            return actor.replies.pop(0)
        self.offer = _Remote(offer)


@dataclass
class Member:
    actor_id: str
    handle: object
    info: ActorReport


class _Pool:
    def __init__(self, actors):
        self.members = [Member(a.actor_id, _Handle(a), a.info) for a in actors]
        self.role = Role.PREFILL

    def by_role(self, role):
        return self.members if role is self.role else []


def reject(retry_after_s=0.0):
    return OfferReply(False, "busy", retry_after_s, 9.0)


ACCEPT = OfferReply(True, "idle", 0.0, 0.1)


async def test_dispatcher_forwards_each_rejection_then_gives_up_with_a_retry_hint():
    from mesh.attempt import Attempt
    from mesh.dispatch import Dispatcher

    a, b = Actor("a", replies=[reject(0.01), ACCEPT]), Actor("b", queued=1, replies=[reject(0.02)])
    dispatcher = Dispatcher(_Pool([a, b]), ForwardOnRejection(max_forwards=4, min_retry_pause_s=0.0),
                            clock=FakeClock(step=1.0))  # one second per look
    events = []
    step = Attempt(ActorRequest("r", [1, 2, 3], SamplingParams()), deadline=1e9, end=1e9, ttft_budget_s=1.0)
    chosen = await dispatcher._offer(step, set(), events)
    assert chosen.actor_id == "a" and (a.offers, b.offers) == (2, 1)
    assert [e.name for e in events] == ["prefill_rejected", "prefill_rejected", "prefill_accepted"]
    a.replies, b.replies = [reject(0.5)] * 2, [reject(0.3)] * 2
    with pytest.raises(MeshError) as info:
        await dispatcher._offer(step, set(), [])
    assert (info.value.code, info.value.retry_after_s) == ("resource_exhausted", 0.3)
    with pytest.raises(MeshError, match="deadline passed"):
        await dispatcher._offer(dataclasses.replace(step, deadline=-1.0), set(), [])


SPECS = parse_specs({"scenarios": [
    {"name": "long", "model": "/m/llama", "slo": {"ttft_s": 5, "tpot_s": 1}, "match": {"min_prompt_tokens": 100}},
    {"name": "code", "model": "/m/llama", "slo": {"ttft_s": 1, "tpot_s": 1}, "match": {"tags": ["code"]}},
    {"name": "chat", "model": "/m/llama", "slo": {"ttft_s": 1, "tpot_s": 1}},
    {"name": "other", "model": "/m/qwen", "slo": {"ttft_s": 1, "tpot_s": 1}},
]})


def test_scenario_router_tags_models_and_rules():
    router = ScenarioRouter(SPECS, {"long": "llama", "code": "llama", "chat": "llama", "other": "qwen"})
    assert router.models() == ["llama", "qwen"]
    assert router.route(RequestFacts(10, scenario="other")) == "other"  # a scenario's name
    assert router.route(RequestFacts(10, model="code")) == "code"  # OpenAI clients put it in `model`
    assert router.route(RequestFacts(10, scenario="code")) == "code"  # a tag the rules name
    assert router.route(RequestFacts(500, model="llama")) == "long"  # first rule that holds, in file order
    assert router.route(RequestFacts(10, model="llama")) == "chat"
    assert router.route(RequestFacts(10, model="qwen")) == "other"
    with pytest.raises(GatewayError, match="unknown scenario 'x'; this gateway serves: chat, code, long, other"):
        router.route(RequestFacts(10, scenario="x"))
    with pytest.raises(GatewayError, match="model 'gpt' is not served here; models: llama, qwen") as info:
        router.route(RequestFacts(10, model="gpt"))
    assert info.value.http_status == 404 and info.value.grpc_status_name == "NOT_FOUND"


def test_deadlines_and_the_in_flight_bound():
    d = Deadlines(admission_timeout_s=5.0, request_timeout_s=60.0, margin_s=0.1)
    assert d.admission(100.0, None) == 105.0 and d.admission(100.0, 2.0) == pytest.approx(101.9)
    assert d.end(100.0, None) == 160.0 and d.end(100.0, 2.0) == 102.0
    limit = InFlightLimit(2)
    limit.acquire()
    limit.acquire()
    with pytest.raises(GatewayError, match="maximum of 2 requests") as info:
        limit.acquire()
    assert (info.value.http_status, info.value.grpc_status_name) == (429, "RESOURCE_EXHAUSTED")
    limit.release()
    limit.acquire()


def test_keys_from_files_and_environment_never_show_in_reprs(tmp_path):
    (tmp_path / "keys").write_text("# inference\nk-one\n  k-two  # trailing comment\n")
    keys = Keys.load(str(tmp_path / "keys"), None, {"PDMESH_API_KEYS": "k-three", "PDMESH_ADMIN_KEY": "s3cret"})
    assert keys.inference == ("k-one", "k-two", "k-three") and keys.admin == ("s3cret",)
    assert "k-one" not in repr(keys) and "s3cret" not in repr(keys)
    keys.check_inference("k-two")
    keys.check_admin("s3cret")
    with pytest.raises(GatewayError, match="wrong admin key"):
        keys.check_admin("k-one")
    with pytest.raises(GatewayError, match="the admin service is off"):
        Keys(("k",)).check_admin("k")
    Keys().check_inference(None)  # no keys: inference is open


def test_openai_bodies():
    body = parse(CompletionBody, {"prompt": ["one prompt"], "max_tokens": 3, "stop": "\n", "top_k": 5, "logprobs": 2})
    assert body.prompt == "one prompt"
    assert body.sampling() == {"max_tokens": 3, "top_k": 5, "stop": ["\n"], "logprobs": True, "top_logprobs": 2}
    chat = parse(ChatBody, {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7})
    assert chat.max_tokens == 7
    for bad, message in [({"prompt": ["a", "b"]}, "one prompt per request"), ({}, "prompt: Field required"),
                         ({"prompt": "a", "frequency_penalty": 1}, "not supported"),
                         ({"prompt": "a", "temperature": "hot"}, "temperature: Input should be a valid number")]:
        with pytest.raises(GatewayError, match=message):
            parse(CompletionBody, bad)
    with pytest.raises(GatewayError, match="must be a JSON object"):
        parse(ChatBody, [1])


def test_request_deadline_ends_the_stream_only_while_it_waits():
    """Past the deadline: DEADLINE_EXCEEDED and the stream closed (which frees the actors' work);
    a consumer busy between chunks is never cancelled in its own code; a client that leaves
    still cancels."""
    import asyncio

    from gateway.service import _until

    closed = []

    async def stream(gaps):
        try:
            for i, gap in enumerate(gaps):
                await asyncio.sleep(gap)
                yield {"i": i}
        finally:
            closed.append(True)

    async def consume(gaps, deadline_s, busy_s=0.0):
        loop = asyncio.get_running_loop()
        got = []
        async for chunk in _until(stream(gaps), loop.time() + deadline_s, loop.time):
            got.append(chunk["i"])
            await asyncio.sleep(busy_s)  # writing to a slow client
        return got

    assert asyncio.run(consume([0, 0, 0], 5.0)) == [0, 1, 2]
    with pytest.raises(GatewayError) as info:
        asyncio.run(consume([0, 0, 10], 0.2))
    assert info.value.code == "deadline_exceeded" and len(closed) == 2
    with pytest.raises(GatewayError, match="past its deadline"):
        asyncio.run(consume([0, 0, 0], 0.1, busy_s=0.15))  # expires during the consumer's write
    assert len(closed) == 3

    async def client_leaves():
        task = asyncio.ensure_future(consume([0, 10], 5.0))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task.cancelled()

    assert asyncio.run(client_leaves()) and len(closed) == 4


def test_scenario_router_matches_a_prompt_prefix_by_hash():
    from scenarios.classify import prefix_digest

    system = list(range(100, 132))  # two blocks of 16
    specs = parse_specs({"scenarios": [
        {"name": "tenant", "model": "/m/llama", "slo": {"ttft_s": 1, "tpot_s": 1},
         "match": {"prefix_hash": {"block_size": 16, "blocks": 2, "hash": prefix_digest(system, 16, 2)}}},
        {"name": "chat", "model": "/m/llama", "slo": {"ttft_s": 1, "tpot_s": 1}},
    ]})
    router = ScenarioRouter(specs, {"tenant": "llama", "chat": "llama"})
    assert router.route(RequestFacts(40, prompt_token_ids=tuple(system + [7] * 8))) == "tenant"
    assert router.route(RequestFacts(40, prompt_token_ids=tuple([1] + system[1:] + [7] * 8))) == "chat"
    assert router.route(RequestFacts(40)) == "chat"  # no token ids: a hash rule cannot hold
