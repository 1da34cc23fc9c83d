"""Cross-scenario overflow as a plain policy: which other scenarios' prefill actors a refused
request is offered to, in which order, under which budget, and which answers place it."""
from __future__ import annotations

from dataclasses import dataclass

from mesh.api import ActorReport, ActorState, LoadReport, OfferReply, Role
from mesh.routing import CrossScenarioOverflow, Host


@dataclass
class Actor:
    actor_id: str
    queued: int = 0  # requests; 100 prompt tokens each

    @property
    def info(self) -> ActorReport:
        return ActorReport(self.actor_id, "s", Role.PREFILL, ActorState.SERVING,
                           load=LoadReport(100 * self.queued, self.queued))


def names(picked):
    return [(host.scenario, actor.actor_id) for host, actor in picked]


def test_the_least_queued_actors_of_every_host_are_offered_first_up_to_max_offers():
    policy = CrossScenarioOverflow(max_offers=3)
    hosts = [Host("a", 0, 1.0, [Actor("a1", 2), Actor("a2", 0)]), Host("b", 0, 2.0, [Actor("b1", 1), Actor("b2", 3)])]
    assert names(policy.candidates(0, hosts)) == [("a", "a2"), ("b", "b1"), ("a", "a1")]


def test_hosts_of_higher_priority_are_never_asked_and_lower_ones_go_first():
    policy = CrossScenarioOverflow(max_offers=4)
    hosts = [Host("vip", 5, 1.0, [Actor("v1")]), Host("same", 1, 1.0, [Actor("s1")]),
             Host("low", 0, 1.0, [Actor("l1", 2)])]
    # the low-priority host's busy actor before the equal one's idle actor; the VIP's never
    assert names(policy.candidates(1, hosts)) == [("low", "l1"), ("same", "s1")]
    assert policy.candidates(-1, hosts) == []


def test_a_host_keeps_its_idle_actors_to_itself():
    policy = CrossScenarioOverflow(max_offers=4, keep_idle=2)
    hosts = [Host("a", 0, 1.0, [Actor("a1"), Actor("a2"), Actor("a3"), Actor("a4", 1)])]
    assert names(policy.candidates(0, hosts)) == [("a", "a3"), ("a", "a4")]
    busy = [Host("b", 0, 1.0, [Actor("b1", 1), Actor("b2", 2)])]  # none idle: nothing to keep
    assert names(policy.candidates(0, busy)) == [("b", "b1"), ("b", "b2")]


def test_the_offer_names_the_hosts_share_of_its_own_ttft_when_that_is_less():
    policy = CrossScenarioOverflow(host_share=0.5)
    busy = Actor("a1", 1)
    host = Host("a", 0, 2.0, [busy])
    assert policy.budget_s(3.0, host, busy) == 1.0  # the host's share
    assert policy.budget_s(0.4, host, busy) == 0.4  # the request's own budget
    assert policy.budget_s(None, host, busy) == 1.0


def test_an_idle_actor_takes_a_guest_past_the_hosts_share_while_the_host_keeps_others_idle():
    policy = CrossScenarioOverflow(host_share=1.0, spare_idle=2)
    idle = [Actor(f"a{k}") for k in range(3)]
    # two other idle actors stay for the host's next requests: the request's own budget
    assert policy.budget_s(12.0, Host("a", 0, 4.0, idle), idle[0]) == 12.0
    # one other idle actor is not enough, and a queued actor keeps to the host's share however many idle
    assert policy.budget_s(12.0, Host("a", 0, 4.0, idle[:2]), idle[0]) == 4.0
    busy = Actor("b", 1)
    assert policy.budget_s(12.0, Host("a", 0, 4.0, [*idle, busy]), busy) == 4.0
    assert policy.budget_s(None, Host("a", 0, 4.0, idle), idle[0]) == 4.0  # no budget of its own: the share


def test_only_an_answer_predicting_the_first_token_within_the_budget_places_the_request():
    policy = CrossScenarioOverflow()
    assert policy.takes(OfferReply(True, "fits the TTFT budget", predicted_ttft_s=0.8), 1.0)
    # an idle actor accepts anything: a first token past the budget would only take the host's time
    assert not policy.takes(OfferReply(True, "idle", predicted_ttft_s=1.5), 1.0)
    assert not policy.takes(OfferReply(False, "predicted TTFT over the budget", predicted_ttft_s=0.5), 1.0)


def test_a_pool_whose_decode_kv_runs_short_does_not_overflow():
    policy = CrossScenarioOverflow(decode_headroom=0.2)
    assert policy.due(20, 100) and policy.due(50, 100)
    # its refusals are its admission control: a request prefilled elsewhere would hold KV its
    # next requests need
    assert not policy.due(19, 100)
    assert policy.due(0, 0)  # nothing reported yet: nothing known against it
