"""Decode placement that predicts the request's TPOT (mesh.routing.ForwardOnRejection.decode_order
with `meets`): a request whose KV transfer takes most of its TPOT target (a long prompt, a few
output tokens) reserves its KV where its steps are fast enough, the most free of those; live
dispatch predicts it from the request's target, the transfer model and the actors' measured steps."""
from __future__ import annotations

import asyncio
import dataclasses

from mesh.api import LoadReport, SamplingParams
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from mesh.routing import ForwardOnRejection, meets_tpot
from tests.simtests.stand_ins import DecodeStandIn, PrefillStandIn, StandInPool
from tests.support.clock import FakeClock


def test_the_transfer_is_spread_over_the_tokens_after_the_first():
    # 80 ms of transfer and 2 steps of 8 ms: 48 ms a token
    assert meets_tpot(0.080, 0.008, 3, 0.05)
    assert not meets_tpot(0.080, 0.011, 3, 0.05)  # 51 ms
    assert meets_tpot(0.080, 0.011, 10, 0.05)  # spread over 9 tokens
    assert meets_tpot(5.0, 1.0, 1, 0.05)  # one token: no TPOT


def decode(actor_id: str, free: int, step_s: float) -> DecodeStandIn:
    d = DecodeStandIn(actor_id)
    d.info = dataclasses.replace(d.info, load=LoadReport(free_blocks=free, decode_step_s=step_s))
    return d


def ids(members) -> list[str]:
    return [m.actor_id for m in members]


def test_where_the_request_meets_its_tpot_comes_first_the_most_free_of_those():
    policy = ForwardOnRejection()
    roomy_slow, fast, less_fast = decode("roomy", 100, 0.02), decode("fast", 10, 0.005), decode("mid", 50, 0.008)
    members = [fast, roomy_slow, less_fast]
    assert ids(policy.decode_order(members)) == ["roomy", "mid", "fast"]  # by room alone
    meets = lambda m: m.info.load.decode_step_s <= 0.01  # noqa: E731
    assert ids(policy.decode_order(members, meets=meets)) == ["mid", "fast", "roomy"]
    # where it meets it nowhere, or everywhere, the order is by room alone
    assert ids(policy.decode_order(members, meets=lambda m: False)) == ["roomy", "mid", "fast"]
    assert ids(policy.decode_order(members, meets=lambda m: True)) == ["roomy", "mid", "fast"]


def test_only_while_the_pools_decode_kv_has_headroom():
    policy = ForwardOnRejection(tpot_headroom=0.4)
    assert policy.places_by_tpot(40, 100) and policy.places_by_tpot(0, 0)  # nothing known yet: nothing against
    assert not policy.places_by_tpot(39, 100)  # room decides: the next requests need it


def reserved_on(tpot_s: float | None, max_tokens: int) -> str:
    """The decode actor live dispatch reserves a 1000-token prompt's KV on, its transfer 80 ms."""
    prefill = PrefillStandIn("p")
    roomy_slow, fast = decode("roomy", 1000, 0.02), decode("fast", 100, 0.005)
    dispatcher = Dispatcher(StandInPool([prefill, roomy_slow, fast]), ForwardOnRejection(), clock=FakeClock(),
                            transfer_s=lambda tokens: 0.080 * tokens / 1000)
    events = []

    async def run():
        req = Request("r", list(range(1, 1001)), SamplingParams(max_tokens=max_tokens), deadline=10.0,
                      ttft_budget_s=1.0, tpot_s=tpot_s)
        async for _ in dispatcher.generate(req, events):
            pass

    asyncio.run(run())
    return next(e.attributes["actor"] for e in events if e.name == "decode_reserved")


def test_live_dispatch_reserves_a_short_outputs_kv_where_its_tpot_is_met():
    # 80 ms + 2 x 20 ms over 2 tokens misses 50 ms on the roomy actor; 80 ms + 2 x 5 ms meets it
    assert reserved_on(0.05, 3) == "fast"
    assert reserved_on(None, 3) == "roomy"  # no target: by room
    assert reserved_on(0.05, 200) == "roomy"  # a long output meets it anywhere
