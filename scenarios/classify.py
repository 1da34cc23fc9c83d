"""Request -> scenario: the first spec (in file order) whose match rules all hold."""
from __future__ import annotations

from dataclasses import dataclass

from mesh.engine.prefix_cache import block_hashes
from scenarios.spec import PrefixHash, ScenarioSpec


def prefix_digest(token_ids: list[int], block_size: int, blocks: int) -> str | None:
    """The hash a `prefix_hash` rule names for a prompt starting with these tokens; None when
    they are shorter than the prefix."""
    if len(token_ids) < blocks * block_size:
        return None
    return f"{block_hashes(list(token_ids[:blocks * block_size]), block_size)[-1]:016x}"


def _starts_with(token_ids: tuple[int, ...], rule: PrefixHash) -> bool:
    return prefix_digest(token_ids, rule.block_size, rule.blocks) == rule.hash


@dataclass(frozen=True)
class RequestInfo:
    prompt_tokens: int
    model: str | None = None  # the model the client asked for; None matches any
    tags: tuple[str, ...] = ()
    prompt_text: str = ""
    prompt_token_ids: tuple[int, ...] = ()  # for prefix_hash rules; empty matches none


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
        if m.prefix_hash is not None and not _starts_with(req.prompt_token_ids, m.prefix_hash):
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
