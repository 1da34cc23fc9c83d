"""Request -> scenario: the first spec (in file order) whose match rules all hold."""
from __future__ import annotations

from dataclasses import dataclass

from scenarios.spec import ScenarioSpec


@dataclass(frozen=True)
class RequestInfo:
    prompt_tokens: int
    model: str | None = None  # the model the client asked for; None matches any
    tags: tuple[str, ...] = ()
    prompt_text: str = ""


class NoScenario(LookupError):
    pass


class Classifier:
    def __init__(self, specs: list[ScenarioSpec]):
        self.specs = list(specs)

    def matches(self, spec: ScenarioSpec, req: RequestInfo) -> bool:
        m = spec.match
        if req.model is not None and req.model != spec.model:
            return False
        if m.tags and not set(m.tags) & set(req.tags):
            return False
        if m.prefix is not None and not req.prompt_text.startswith(m.prefix):
            return False
        if req.prompt_tokens < m.min_prompt_tokens:
            return False
        return m.max_prompt_tokens is None or req.prompt_tokens < m.max_prompt_tokens

    def classify(self, req: RequestInfo) -> str:
        for spec in self.specs:
            if self.matches(spec, req):
                return spec.name
        raise NoScenario(f"no scenario matches a request of {req.prompt_tokens} prompt tokens, "
                         f"model {req.model!r}, tags {list(req.tags)}")
