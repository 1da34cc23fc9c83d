"""Gateway policies: which scenario a request goes to, how long it may wait to be admitted,
and how many requests one gateway holds at once.

Plain objects taking what the request says and the clock, without Ray or grpc, so that
simtests/ runs the same code. Placement inside a scenario's pool (reserve on decode,
offer to prefill idle-first, forward on rejection) is mesh.routing's policy.
"""
from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import GatewayError
from scenarios.classify import Classifier, NoScenario, RequestInfo
from scenarios.spec import ScenarioSpec


@dataclass(frozen=True)
class RequestFacts:
    """What classification looks at."""
    prompt_tokens: int
    prompt_text: str = ""  # empty when the client sent token ids
    scenario: str = ""  # an explicit tag: a scenario's name, or a tag its match rules name
    model: str = ""  # the model name the client asked for; empty: any
    prompt_token_ids: tuple[int, ...] = ()  # when known: prefix_hash rules look at them


class ScenarioRouter:
    """An explicit scenario name wins (an OpenAI client's `model` may name a scenario too);
    otherwise the first spec in file order whose rules hold, among those serving the model."""

    def __init__(self, specs: list[ScenarioSpec], served_names: dict[str, str]):
        self.specs = {s.name: s for s in specs}
        self.served = served_names  # scenario -> the model name clients use
        self.classifier = Classifier(specs)

    def models(self) -> list[str]:
        return sorted(set(self.served.values()))

    def route(self, facts: RequestFacts) -> str:
        if facts.scenario in self.specs:
            return facts.scenario
        if facts.model in self.specs and not facts.scenario:
            return facts.model
        if facts.scenario and not any(facts.scenario in s.match.tags for s in self.specs.values()):
            raise GatewayError("not_found", f"unknown scenario {facts.scenario!r}; this gateway serves: "
                                            f"{', '.join(sorted(self.specs))}")
        checkpoints = {self.specs[name].model for name, served in self.served.items() if served == facts.model}
        if facts.model and not checkpoints:
            raise GatewayError("not_found", f"model {facts.model!r} is not served here; models: "
                                            f"{', '.join(self.models())} (GET /v1/models)")
        tags = (facts.scenario,) if facts.scenario else ()
        for checkpoint in sorted(checkpoints) or [None]:
            try:
                return self.classifier.classify(RequestInfo(facts.prompt_tokens, checkpoint, tags, facts.prompt_text,
                                                                facts.prompt_token_ids))
            except NoScenario:
                continue
        raise GatewayError("invalid_argument", f"no scenario takes this request ({facts.prompt_tokens} prompt "
                                               f"tokens, model {facts.model or 'any'!r}, tag "
                                               f"{facts.scenario or 'none'!r}): check the scenarios' match rules")


@dataclass(frozen=True)
class Deadlines:
    """A request may be offered to prefill actors for `admission_timeout_s`, and may run for
    `request_timeout_s`, never past the client's own deadline. Admission stops a margin
    before the client's deadline, so that the client hears RESOURCE_EXHAUSTED with a retry
    hint rather than its deadline passing."""
    admission_timeout_s: float
    request_timeout_s: float
    margin_s: float = 0.05

    def admission(self, now: float, client_time_left_s: float | None) -> float:
        limit = self.admission_timeout_s
        if client_time_left_s is not None:
            limit = min(limit, client_time_left_s - self.margin_s)
        return now + limit

    def end(self, now: float, client_time_left_s: float | None) -> float:
        return now + min(self.request_timeout_s, client_time_left_s if client_time_left_s is not None else float("inf"))


class InFlightLimit:
    """A bounded gateway: past `limit` requests in flight, new ones are refused at once
    (RESOURCE_EXHAUSTED) instead of queueing without bound."""

    def __init__(self, limit: int, retry_after_s: float = 0.5):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    def acquire(self) -> None:
        if self.in_flight >= self.limit:
            raise GatewayError("resource_exhausted", f"the gateway is serving its maximum of {self.limit} requests "
                                                     "(gateway.max_concurrent_requests); retry later",
                               retry_after_s=self.retry_after_s)
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
