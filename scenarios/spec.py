"""Scenario specs: what a scenario serves, which requests are its own, its SLOs and its limits.

A YAML file holds a list under `scenarios:`; every field is validated on load and
a bad file fails with the scenario, the field and what to fix.

`mode` is how its pool serves (mesh.serving_mode): disaggregated (prefill and decode actors,
the default), aggregated (`both` actors, each running whole requests; `prefill` and
`decode` default to 0 there) or auto (prefill and decode actors; a decode actor prefills
short prompts itself, and the controller may aggregate the pool while the load is light).
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mesh.hardware import Hardware
from mesh.serving_mode import Mode
from mesh.roles import MOVABLE, Role


class SpecError(ValueError):
    """A scenario file or spec that cannot be used, with what to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrefixHash(_Strict):
    """The prompt's first `blocks` blocks of `block_size` tokens hash to `hash`: the engine's
    chained block hash (mesh.engine.prefix_cache), 16 hex digits, which covers every token up
    to the end of the last block. It matches a tenant's long shared prompt when clients send
    token ids (no text to compare), without keeping the prompt in the spec;
    scenarios.classify.prefix_digest computes it from the prompt's tokens."""
    block_size: int = Field(ge=1)
    blocks: int = Field(ge=1)
    hash: str = Field(pattern=r"^[0-9a-f]{16}$")


class Match(_Strict):
    """A request belongs to the scenario when every rule given holds."""
    tags: tuple[str, ...] = ()  # any of these tags
    prefix: str | None = None  # the prompt text starts with it (a system prompt)
    prefix_hash: PrefixHash | None = None  # the prompt's tokens start with a known prefix
    min_prompt_tokens: int = Field(0, ge=0)
    max_prompt_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _range(self) -> "Match":
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= self.min_prompt_tokens:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) must be above "
                             f"min_prompt_tokens ({self.min_prompt_tokens})")
        return self


class SLO(_Strict):
    ttft_s: float = Field(gt=0, description="time to first token target")
    tpot_s: float = Field(gt=0, description="time per output token target")
    percentile: float = Field(90.0, gt=0, le=100, description="share of requests that must meet both")


class RoleLimits(_Strict):
    min: int = Field(1, ge=0)
    max: int = Field(1_000_000, ge=1)

    @model_validator(mode="after")
    def _order(self) -> "RoleLimits":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class ScenarioSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field(min_length=1)
    match: Match = Match()
    slo: SLO
    hardware: dict[Role, Hardware] = Field(default_factory=lambda: {Role.PREFILL: Hardware(), Role.DECODE: Hardware()})
    prefill: int = Field(1, ge=0, description="initial prefill actors")
    decode: int = Field(1, ge=0, description="initial decode actors")
    limits: dict[Role, RoleLimits] = Field(default_factory=lambda: {Role.PREFILL: RoleLimits(),
                                                                     Role.DECODE: RoleLimits()})
    priority: int = Field(0, description="higher wins when scenarios compete for lent actors")
    overflow: bool = Field(True, description="a request its own prefill actors refuse may be prefilled by an idle "
                           "prefill actor of another scenario of the same model (and this scenario's idle ones "
                           "take theirs); its decode stays here (mesh.routing.CrossScenarioOverflow)")
    mode: Mode = Field(Mode.DISAGGREGATED, description="disaggregated, aggregated or auto (mesh.serving_mode)")
    both: int = Field(0, ge=0, description="initial aggregated actors (mode: aggregated; default 1 there)")
    local_prefill_tokens: int | None = Field(None, ge=0, description="mode auto: prompts of at most this many "
                                             "uncached tokens prefill on the decode actor; default: what the "
                                             "performance model prefills within one TPOT target")

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data: object) -> object:
        """An aggregated scenario starts one both actor and no prefill or decode actor (their
        limits then start at 0); both actors run on the decode hardware unless it says."""
        if not isinstance(data, dict):
            return data
        mode = data.get("mode", Mode.DISAGGREGATED)
        if mode not in set(Mode):
            return data  # the field's own error says what is allowed
        data = dict(data)
        mode = Mode(mode)
        if mode is Mode.AGGREGATED:
            data.setdefault("both", 1)
            data.setdefault("prefill", 0)
            data.setdefault("decode", 0)
            limits = dict(data.get("limits") or {})
            for role in MOVABLE:
                limits.setdefault(role.value, RoleLimits(min=0))
            data["limits"] = limits
        if mode is not Mode.DISAGGREGATED and isinstance(data.get("hardware", {}), dict):
            hardware = dict(data.get("hardware") or {"prefill": Hardware(), "decode": Hardware()})
            if "both" not in hardware:  # Role values are their strings: either spelling matches
                hardware["both"] = hardware.get("decode", Hardware())
            data["hardware"] = hardware
        return data

    @field_validator("limits")
    @classmethod
    def _both_roles(cls, v: dict) -> dict:
        return {**v, **{role: v.get(role, RoleLimits()) for role in MOVABLE}}

    @model_validator(mode="after")
    def _roles_fit_mode(self) -> "ScenarioSpec":
        if self.mode is Mode.AGGREGATED:
            if self.prefill or self.decode:
                raise ValueError("an aggregated scenario runs both actors only: leave out prefill and decode "
                                 "(or set them to 0) and give the count as both")
            if not self.both:
                raise ValueError("an aggregated scenario needs at least one actor: set both to 1 or more")
        elif self.both:
            raise ValueError(f"a {self.mode} scenario runs prefill and decode actors: leave out both, or set "
                             "mode: aggregated")
        if self.local_prefill_tokens is not None and self.mode is not Mode.AUTO:
            raise ValueError("local_prefill_tokens applies to mode: auto only")
        return self

    @model_validator(mode="after")
    def _initial_within_limits(self) -> "ScenarioSpec":
        for role, lim in self.limits.items():
            n = getattr(self, role.value)
            if not lim.min <= n <= lim.max:
                raise ValueError(f"initial {role} count {n} is outside its limits [{lim.min}, {lim.max}]")
        return self


def parse_specs(data: object, source: str = "scenarios") -> list[ScenarioSpec]:
    """Specs from parsed YAML/JSON: {"scenarios": [ {...}, ... ]}."""
    if not isinstance(data, dict) or not isinstance(data.get("scenarios"), list) or not data["scenarios"]:
        raise SpecError(f"{source}: expected a mapping with a non-empty list under 'scenarios:'")
    specs = []
    for i, item in enumerate(data["scenarios"]):
        label = item.get("name", f"#{i + 1}") if isinstance(item, dict) else f"#{i + 1}"
        try:
            specs.append(ScenarioSpec.model_validate(item))
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(spec)'}: {err['msg']}"
                                 for err in e.errors())
            raise SpecError(f"{source}: scenario {label}: {problems}") from None
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"{source}: scenario names must be unique; repeated: {', '.join(dupes)}")
    return specs


def read_yaml(path: str | Path, what: str = "config file") -> object:
    """A YAML file's data; SpecError saying what to fix when it cannot be read or parsed."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None


def load_specs(path: str | Path) -> list[ScenarioSpec]:
    return parse_specs(read_yaml(path, "scenario file"), str(path))
