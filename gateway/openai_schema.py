"""OpenAI request bodies (completions and chat completions), validated with pydantic, and their
translation to the gateway's GenerateCall. Fields pdmesh has no use for are ignored, as
OpenAI-compatible servers do; fields whose answer it cannot honour (penalties, logit_bias,
response_format other than text, tools) are refused with 400 naming the field (`param`).

Bodies are parsed from their bytes by pydantic's own JSON parser, which refuses what Python's
json module lets through to fail later: lone surrogates ("\\ud800", which no tokenizer or UTF-8
encoder takes), bytes that are not UTF-8, nesting past its recursion limit, NaN and infinity.
Sampling values are checked by SamplingParams, as for gRPC, so both front ends accept the
same values and say the same about the rest."""
from __future__ import annotations


from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import GatewayError
from mesh import MAX_TOP_LOGPROBS

MAX_N = 128  # choices per request: OpenAI's limit; each is one request to the mesh

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
    logit_bias: dict | None = None
    response_format: dict | None = None
    scenario: str = Field("", description="explicit scenario tag (pdmesh extension)")
    request_id: str = ""
    return_tokens_as_token_ids: bool = False  # vLLM's extension: logprobs' tokens as "token_id:<id>"

    @model_validator(mode="after")
    def _supported(self):
        if not 1 <= self.n <= MAX_N:
            _refuse("n", f"n must be between 1 and {MAX_N}, got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                _refuse(name, f"{name} is not supported: leave it at 0")
        if self.logit_bias:
            _refuse("logit_bias", "logit_bias is not supported: leave it out")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            _refuse("response_format", f"response_format {self.response_format.get('type')!r} is not supported: "
                                       "pdmesh does not constrain output to JSON; leave response_format out "
                                       "(or send {\"type\": \"text\"})")
        return self

    def top_logprobs_asked(self) -> int | None:
        """None: no logprobs; else how many top alternatives per token (0: the chosen token's only)."""
        raise NotImplementedError

    def sampling(self) -> dict:
        """The SamplingParams fields the client set."""
        out = {k: getattr(self, k) for k in ("max_tokens", "temperature", "top_p", "top_k", "min_tokens", "seed",
                                             "stop_token_ids") if getattr(self, k) is not None}
        if self.stop:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.ignore_eos:
            out["ignore_eos"] = True
        top = self.top_logprobs_asked()
        if top is not None:
            out["logprobs"] = True
            if top:
                out["top_logprobs"] = top
        return out

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # the chosen token's and N alternatives
    echo: bool = False

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                _refuse("prompt", f"prompt: one prompt per request (got {len(self.prompt)}); send them separately")
            self.prompt = self.prompt[0]
        if self.echo:
            _refuse("echo", "echo is not supported: leave it out")
        return self

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None  # the deprecated forms of tools and tool_choice
    function_call: str | dict | None = None

    @model_validator(mode="after")
    def _max_tokens(self):
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    @model_validator(mode="after")
    def _no_tools(self):
        for name in ("tools", "functions"):
            if getattr(self, name):
                _refuse(name, f"{name} is not supported: pdmesh does not call tools; leave {name} out")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                _refuse(name, f"{name} is not supported: pdmesh does not call tools; leave {name} out "
                              "(or send \"none\")")
        if self.top_logprobs and not self.logprobs:
            _refuse("top_logprobs", "top_logprobs needs logprobs: set logprobs to true")
        return self

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def _refuse(param: str, message: str):
    """A field pdmesh cannot honour: raised through pydantic (which wraps only ValueErrors), with the field named."""
    raise GatewayError("invalid_argument", message, param=param)


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
    problems = "; ".join(_problem(err) for err in errors)
    return GatewayError("invalid_argument", problems, param=".".join(map(str, first["loc"])) or None)


def _problem(err: dict) -> str:
    """One field's problem as "field: what is wrong" (a whole-body check's as its message alone)."""
    message = err["msg"].removeprefix("Value error, ")
    where = ".".join(map(str, err["loc"]))
    return f"{where}: {message}" if where else message
