"""What crosses the mesh's boundaries: the values the gateway and the dispatcher exchange with
the actors over Ray, and the reports the pool keeps of them. Every one is a frozen dataclass;
readers use attributes, and "no value" is None.

An actor answers `info()` with an `ActorReport` (its `LoadReport` and `PrefixReport` inside),
`offer()` with an `OfferReply`, `reserve()` with a `Lease`, `drain()` / `set_role()` with a
`DrainResult`; it is handed an `ActorRequest`; `prefill()` streams a `FirstToken`, then a
`Committed`; `decode()` and `generate()` stream `StreamChunk`s, as the dispatcher does to the
gateway. An actor is started from an `ActorSpec`, whose engine and transport settings are
validated where the spec is made (the driver), not in the actor.

Imports no torch, Ray or transport at run time (the transport's types are annotations
only), so the gateway's CLIs can use these types cheaply.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from mesh.engine.config import EngineConfig
from mesh.engine.sampling_params import SamplingParams
from mesh.roles import MOVABLE, Role

if TYPE_CHECKING:
    from transport import LeaseDescriptor, TransferStats, TransportConfig

__all__ = [
    "DEFAULT_CHUNK_TOKENS", "MOVABLE", "ActorReport", "ActorRequest", "ActorSpec", "ActorState",
    "Committed", "DrainResult", "EngineConfig", "FirstToken", "Lease", "Life", "LoadReport",
    "OfferReply", "PrefixCacheStats", "PrefixReport", "Role", "SamplingParams", "StepSample", "StreamChunk",
    "engine_config", "transport_config",
]


class ActorState(str, enum.Enum):
    """Where an actor is in its life. The actor itself reports the first three; DEAD is the
    pool's verdict (its process died or stopped answering)."""
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    DEAD = "dead"

    def __str__(self) -> str:  # "serving" in labels and messages, as Role does
        return self.value


DEFAULT_CHUNK_TOKENS = 64  # prompt tokens per hash of a PrefixReport (rounded up to whole blocks)


# -- what an actor reports ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """The engine's prefix cache figures, in blocks."""
    hits: int
    queries: int
    evictions: int
    cached: int


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measurement an actor made, for the live calibration of the performance model
    (scenarios.calibration): a prefill step, a decode-only step, or a KV send. `seq` grows by one
    per sample on the actor, so that a reader of reports learns each sample once."""
    seq: int
    kind: str  # "prefill", "decode" or "transfer"
    size: int  # prefill: tokens computed; decode: sequences in the batch; transfer: ops
    extent: int  # prefill: sum over the batch of tokens x context (attention); decode: context tokens; transfer: bytes
    seconds: float


@dataclass(frozen=True, slots=True)
class LoadReport:
    """An actor's load when it reported; all zero for one that has not started its engine."""
    queued_prompt_tokens: int = 0  # accepted for prefill and not yet prefilled
    queued_requests: int = 0
    active_requests: int = 0  # in flight on the actor, any phase
    free_blocks: int = 0  # KV blocks
    num_blocks: int = 0
    prefill_tokens_per_s: float = 0.0  # measured
    decode_step_s: float = 0.0  # measured
    prefix_cache: PrefixCacheStats | None = None  # None: the engine caches no prefixes
    samples: tuple[StepSample, ...] = ()  # the most recent measurements, oldest first

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks


@dataclass(frozen=True, slots=True)
class PrefixReport:
    """The chunk hashes of the prompts an actor prefilled (mesh.prefix_index.PrefixRecord);
    `version` changes whenever they do."""
    chunk_tokens: int
    version: int
    hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ActorReport:
    """An actor's answer to `info()`: who and where it is, and its load. The pool keeps the
    last one per actor (for one starting or dead, the pool writes it: no load)."""
    actor_id: str
    scenario: str
    role: Role
    state: ActorState
    pid: int | None = None
    node: str | None = None  # the IP address of its Ray node
    device: str | None = None  # torch device of the engine, "cpu" or "cuda:0"
    model: str | None = None  # checkpoint folder
    block_size: int | None = None  # tokens per KV block
    tensor_parallel_size: int = 1  # ranks its engine spans (each holding some KV heads)
    placement_group: str | None = None  # the Ray placement group holding its ranks' bundles (hex id)
    load: LoadReport = LoadReport()
    prefix: PrefixReport | None = None  # None: no engine yet


@dataclass(frozen=True, slots=True)
class Life:
    """The pool's record of one actor's life (wall clock, time.time()); kept across reports,
    so that the status shows how long a replacement took."""
    starting_at: float | None = None
    serving_at: float | None = None
    dead_at: float | None = None  # of this actor; for a replacement, of the actor it replaces
    replaces: str | None = None  # the dead actor this one replaces
    reason: str | None = None  # why it is dead
    starts: int = 0  # replacement starts tried, for a dead actor
    last_error: str | None = None  # of the last failed replacement start
    given_up: bool = False  # dead, and nothing will replace it


# -- one request on its way through the actors ------------------------------------------------
@dataclass(frozen=True, slots=True)
class ActorRequest:
    """What the dispatcher hands an actor for one attempt of a request. An attempt after a
    failure carries the tokens already sent: the actor computes them with the prompt and goes
    on from them, as if the request never moved."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    trace_context: dict[str, str] | None = None  # W3C headers of the parent span

    @property
    def token_ids(self) -> list[int]:
        """The tokens whose KV the actors compute and move: the prompt and those already sent."""
        return self.prompt_token_ids + self.output_token_ids


@dataclass(frozen=True, slots=True)
class OfferReply:
    """A prefill actor's answer to an offer (mesh.admission), at once."""
    accept: bool
    reason: str = ""
    retry_after_s: float = 0.0  # when a rejecting actor may have room
    predicted_ttft_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Lease:
    """A decode actor's KV reservation for one request (its answer to `reserve`). The prompt's
    first `prefix_tokens` (`prefix_blocks` blocks) it holds already: the prefill side writes
    only what follows into the descriptor's blocks. A decode actor with tensor-parallel ranks
    leases in parts, one per receiving rank and range of KV heads: `descriptor` is the first
    (its lease id names the lease), `rest` the others."""
    descriptor: LeaseDescriptor
    prefix_tokens: int = 0
    prefix_blocks: int = 0
    rest: tuple[LeaseDescriptor, ...] = ()

    @property
    def parts(self) -> tuple[LeaseDescriptor, ...]:
        return (self.descriptor, *self.rest)

    @property
    def lease_id(self) -> str:
        return self.descriptor.lease_id

    @property
    def ttl_s(self) -> float:
        return self.descriptor.ttl_s


@dataclass(frozen=True, slots=True)
class FirstToken:
    """A prefill's first message, as soon as the first token is sampled. `finish_reason` is
    set when the request ended with it; otherwise `trace_context` is that of the KV transfer
    span, the decode span's parent (None when no lease was given)."""
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str | None
    trace_context: dict[str, str] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, when asked: the most likely (id, logprob)


@dataclass(frozen=True, slots=True)
class Committed:
    """A prefill's second message: the KV is in the decode actor's lease."""
    transfer: TransferStats
    skipped_tokens: int  # the lease's prefix, not sent
    seconds: float  # from the first token to the commit: the transfer's exposed part (layer-wise, the rest
                    # went out while the prefill computed)


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One burst of a request's output, as actors stream it and the dispatcher yields it."""
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finished: bool
    finish_reason: str | None  # set on the last chunk: "stop" or "length"
    num_prompt_tokens: int
    num_output_tokens: int  # so far, the tokens sent before the request moved included
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, when asked: the most likely (id, logprob)


@dataclass(frozen=True, slots=True)
class FeedItem:
    """One request's message on its actor's token feed (mesh/token_feed.py): a chunk of its
    output, or the error that ended it (a MeshError, RequestMoved included)."""
    request_id: str
    chunk: StreamChunk | None = None
    error: Exception | None = None


@dataclass(frozen=True, slots=True)
class DrainResult:
    """What a drain, flip or lend did: the requests the actor gave back (each moves to another
    actor), its report afterwards, and the pool's warning when a forced change broke the role
    rules."""
    moved: tuple[str, ...]
    report: ActorReport
    warning: str | None = None


# -- starting an actor --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ActorSpec:
    actor_id: str
    scenario: str
    role: Role
    engine: EngineConfig
    transport: TransportConfig
    ttft_budget_s: float = 2.0
    drain_timeout_s: float = 60.0
    warmup: bool = True
    otel_env: dict[str, str] = field(default_factory=dict)  # the driver's OTEL_* settings: where spans go
    prefix_chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # granularity of the prefix report (rounded up to blocks)
    faults: str = ""  # armed fault-injection points (mesh.faults), for tests
    fault_log: str | None = None  # where a fault that fires is recorded
    layerwise_kv: bool = False  # prefills send each layer's KV as soon as the engine computed it


def engine_config(fields: Mapping[str, Any]) -> EngineConfig:
    """An EngineConfig from a config file's `engine:` fields; a ValueError names each bad one."""
    try:
        return EngineConfig(**fields)
    except ValidationError as e:
        raise ValueError(_problems("engine", e)) from None


def transport_config(fields: Mapping[str, Any]) -> TransportConfig:
    """A TransportConfig from a config file's `transport:` fields, checked as EngineConfig's
    are (names and types); a ValueError names each bad one."""
    from transport.config import TransportConfig  # the transport package loads torch

    known = {f.name for f in dataclasses.fields(TransportConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"transport.{unknown[0]}: no such field; transport has: {', '.join(sorted(known))}")
    try:
        return TypeAdapter(TransportConfig).validate_python(dict(fields))
    except ValidationError as e:
        raise ValueError(_problems("transport", e)) from None


def _problems(section: str, error: ValidationError) -> str:
    out = []
    for err in error.errors():
        where = ".".join((section, *map(str, err["loc"])))
        what = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        out.append(f"{where}: {what}")
    return "; ".join(out)
