"""OpenAI request bodies (completions and chat completions), validated with pydantic, and their
translation to the gateway's GenerateCall. Fields pdmesh has no use for are ignored, as
OpenAI-compatible servers do; fields it cannot honour (n > 1, penalties) are refused.

Bodies are parsed from their bytes by pydantic's own JSON parser, which refuses what Python's
json module lets through to fail later: lone surrogates ("\\ud800", which no tokenizer or UTF-8
encoder takes), bytes that are not UTF-8, nesting past its recursion limit, NaN and infinity.
Sampling values are checked by SamplingParams, as for gRPC, so both front ends accept the
same values and say the same about the rest."""
from __future__ import annotations


from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import GatewayError

# pydantic's JSON errors, and what the client should change
_JSON_HINTS = (("recursion limit", "nest it less deeply"),
               ("hex escape", "send whole surrogate pairs (no lone \\ud800-\\udfff escapes)"),
               ("unicode code point", "encode it as UTF-8"),
               ("number out of range", "send smaller numbers"))


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension
    min_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    scenario: str = Field("", description="explicit scenario tag (pdmesh extension)")
    request_id: str = ""

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError(f"n must be 1: pdmesh returns one choice per request (got {self.n})")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported: leave them at 0")
        return self

    def sampling(self, logprobs: bool) -> dict:
        out = {k: getattr(self, k) for k in ("max_tokens", "temperature", "top_p", "top_k", "min_tokens", "seed",
                                             "stop_token_ids") if getattr(self, k) is not None}
        if self.stop:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.ignore_eos:
            out["ignore_eos"] = True
        if logprobs:
            out["logprobs"] = True
        return out

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # OpenAI: how many top alternatives; pdmesh reports the chosen token's
    echo: bool = False

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise ValueError(f"prompt: one prompt per request (got {len(self.prompt)}); send them separately")
            self.prompt = self.prompt[0]
        if self.echo:
            raise ValueError("echo is not supported")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False

    @model_validator(mode="after")
    def _max_tokens(self):
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


def parse(cls: type[_Body], data: object) -> _Body:
    if not isinstance(data, dict):
        raise GatewayError("invalid_argument", "the body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _invalid(e) from None


def parse_json(cls: type[_Body], raw: bytes) -> _Body:
    """A body from the request's bytes."""
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        raise _invalid(e) from None


def _invalid(e: ValidationError) -> GatewayError:
    errors = e.errors(include_input=False, include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = first["msg"].removeprefix("Invalid JSON: ")
        hint = next((h for marker, h in _JSON_HINTS if marker in detail), "send one JSON object")
        return GatewayError("invalid_argument", f"the body is not valid JSON: {detail}; {hint}")
    if first["type"] == "model_type" and not first["loc"]:
        return GatewayError("invalid_argument", "the body must be a JSON object")
    problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in errors)
    return GatewayError("invalid_argument", problems)
