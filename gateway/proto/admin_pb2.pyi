from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ActorLoad(_message.Message):
    __slots__ = ("queued_prompt_tokens", "queued_requests", "active_requests", "free_blocks", "num_blocks", "prefill_tokens_per_s", "decode_step_s")
    QUEUED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_S_FIELD_NUMBER: _ClassVar[int]
    queued_prompt_tokens: int
    queued_requests: int
    active_requests: int
    free_blocks: int
    num_blocks: int
    prefill_tokens_per_s: float
    decode_step_s: float
    def __init__(self, queued_prompt_tokens: _Optional[int] = ..., queued_requests: _Optional[int] = ..., active_requests: _Optional[int] = ..., free_blocks: _Optional[int] = ..., num_blocks: _Optional[int] = ..., prefill_tokens_per_s: _Optional[float] = ..., decode_step_s: _Optional[float] = ...) -> None: ...

class ActorInfo(_message.Message):
    __slots__ = ("actor_id", "scenario", "role", "state", "pid", "node", "device", "model", "load", "waiting_for")
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    actor_id: str
    scenario: str
    role: str
    state: str
    pid: int
    node: str
    device: str
    model: str
    load: ActorLoad
    waiting_for: str
    def __init__(self, actor_id: _Optional[str] = ..., scenario: _Optional[str] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., pid: _Optional[int] = ..., node: _Optional[str] = ..., device: _Optional[str] = ..., model: _Optional[str] = ..., load: _Optional[_Union[ActorLoad, _Mapping]] = ..., waiting_for: _Optional[str] = ...) -> None: ...

class Pool(_message.Message):
    __slots__ = ("scenario", "model", "actors")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTORS_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    model: str
    actors: _containers.RepeatedCompositeFieldContainer[ActorInfo]
    def __init__(self, scenario: _Optional[str] = ..., model: _Optional[str] = ..., actors: _Optional[_Iterable[_Union[ActorInfo, _Mapping]]] = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ("scenario",)
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    def __init__(self, scenario: _Optional[str] = ...) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools",)
    POOLS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[Pool]
    def __init__(self, pools: _Optional[_Iterable[_Union[Pool, _Mapping]]] = ...) -> None: ...

class SetRatioRequest(_message.Message):
    __slots__ = ("scenario", "prefill", "decode", "auto")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    prefill: int
    decode: int
    auto: bool
    def __init__(self, scenario: _Optional[str] = ..., prefill: _Optional[int] = ..., decode: _Optional[int] = ..., auto: _Optional[bool] = ...) -> None: ...

class FlipActorRequest(_message.Message):
    __slots__ = ("actor_id", "role", "drain_timeout_s", "force")
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    actor_id: str
    role: str
    drain_timeout_s: float
    force: bool
    def __init__(self, actor_id: _Optional[str] = ..., role: _Optional[str] = ..., drain_timeout_s: _Optional[float] = ..., force: _Optional[bool] = ...) -> None: ...

class DrainActorRequest(_message.Message):
    __slots__ = ("actor_id", "timeout_s", "force")
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    actor_id: str
    timeout_s: float
    force: bool
    def __init__(self, actor_id: _Optional[str] = ..., timeout_s: _Optional[float] = ..., force: _Optional[bool] = ...) -> None: ...

class DrainActorResponse(_message.Message):
    __slots__ = ("moved_request_ids", "actor")
    MOVED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    moved_request_ids: _containers.RepeatedScalarFieldContainer[str]
    actor: ActorInfo
    def __init__(self, moved_request_ids: _Optional[_Iterable[str]] = ..., actor: _Optional[_Union[ActorInfo, _Mapping]] = ...) -> None: ...

class AddActorRequest(_message.Message):
    __slots__ = ("scenario", "role", "force")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    role: str
    force: bool
    def __init__(self, scenario: _Optional[str] = ..., role: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RemoveActorRequest(_message.Message):
    __slots__ = ("actor_id", "drain_timeout_s", "force")
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    actor_id: str
    drain_timeout_s: float
    force: bool
    def __init__(self, actor_id: _Optional[str] = ..., drain_timeout_s: _Optional[float] = ..., force: _Optional[bool] = ...) -> None: ...

class RemoveActorResponse(_message.Message):
    __slots__ = ("actor_id",)
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    actor_id: str
    def __init__(self, actor_id: _Optional[str] = ...) -> None: ...

class SetControllerRequest(_message.Message):
    __slots__ = ("scenario", "enabled")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    enabled: bool
    def __init__(self, scenario: _Optional[str] = ..., enabled: _Optional[bool] = ...) -> None: ...

class GetControllerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoleLimits(_message.Message):
    __slots__ = ("min", "max")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min: int
    max: int
    def __init__(self, min: _Optional[int] = ..., max: _Optional[int] = ...) -> None: ...

class ObservedLoad(_message.Message):
    __slots__ = ("arrival_rps", "mean_prompt_tokens", "mean_output_tokens", "ttft_attainment", "tpot_attainment", "requests_ended", "ttft_target_s", "tpot_target_s", "slo_percentile")
    ARRIVAL_RPS_FIELD_NUMBER: _ClassVar[int]
    MEAN_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_ATTAINMENT_FIELD_NUMBER: _ClassVar[int]
    TPOT_ATTAINMENT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ENDED_FIELD_NUMBER: _ClassVar[int]
    TTFT_TARGET_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_TARGET_S_FIELD_NUMBER: _ClassVar[int]
    SLO_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    arrival_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    ttft_attainment: float
    tpot_attainment: float
    requests_ended: int
    ttft_target_s: float
    tpot_target_s: float
    slo_percentile: float
    def __init__(self, arrival_rps: _Optional[float] = ..., mean_prompt_tokens: _Optional[float] = ..., mean_output_tokens: _Optional[float] = ..., ttft_attainment: _Optional[float] = ..., tpot_attainment: _Optional[float] = ..., requests_ended: _Optional[int] = ..., ttft_target_s: _Optional[float] = ..., tpot_target_s: _Optional[float] = ..., slo_percentile: _Optional[float] = ...) -> None: ...

class ScenarioControl(_message.Message):
    __slots__ = ("scenario", "enabled", "target_prefill", "target_decode", "pinned", "prefill", "decode", "prefill_limits", "decode_limits", "observed", "prefill_model_error", "decode_model_error", "mode", "configured_mode", "switching", "both")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    TARGET_PREFILL_FIELD_NUMBER: _ClassVar[int]
    TARGET_DECODE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LIMITS_FIELD_NUMBER: _ClassVar[int]
    DECODE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MODEL_ERROR_FIELD_NUMBER: _ClassVar[int]
    DECODE_MODEL_ERROR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_MODE_FIELD_NUMBER: _ClassVar[int]
    SWITCHING_FIELD_NUMBER: _ClassVar[int]
    BOTH_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    enabled: bool
    target_prefill: int
    target_decode: int
    pinned: bool
    prefill: int
    decode: int
    prefill_limits: RoleLimits
    decode_limits: RoleLimits
    observed: ObservedLoad
    prefill_model_error: float
    decode_model_error: float
    mode: str
    configured_mode: str
    switching: bool
    both: int
    def __init__(self, scenario: _Optional[str] = ..., enabled: _Optional[bool] = ..., target_prefill: _Optional[int] = ..., target_decode: _Optional[int] = ..., pinned: _Optional[bool] = ..., prefill: _Optional[int] = ..., decode: _Optional[int] = ..., prefill_limits: _Optional[_Union[RoleLimits, _Mapping]] = ..., decode_limits: _Optional[_Union[RoleLimits, _Mapping]] = ..., observed: _Optional[_Union[ObservedLoad, _Mapping]] = ..., prefill_model_error: _Optional[float] = ..., decode_model_error: _Optional[float] = ..., mode: _Optional[str] = ..., configured_mode: _Optional[str] = ..., switching: _Optional[bool] = ..., both: _Optional[int] = ...) -> None: ...

class ControllerStatus(_message.Message):
    __slots__ = ("scenarios", "interval_s")
    SCENARIOS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    scenarios: _containers.RepeatedCompositeFieldContainer[ScenarioControl]
    interval_s: float
    def __init__(self, scenarios: _Optional[_Iterable[_Union[ScenarioControl, _Mapping]]] = ..., interval_s: _Optional[float] = ...) -> None: ...

class GetDecisionsRequest(_message.Message):
    __slots__ = ("scenario", "limit")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    limit: int
    def __init__(self, scenario: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class DecisionAction(_message.Message):
    __slots__ = ("kind", "actor_id", "scenario", "role", "to_scenario")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TO_SCENARIO_FIELD_NUMBER: _ClassVar[int]
    kind: str
    actor_id: str
    scenario: str
    role: str
    to_scenario: str
    def __init__(self, kind: _Optional[str] = ..., actor_id: _Optional[str] = ..., scenario: _Optional[str] = ..., role: _Optional[str] = ..., to_scenario: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("time_unix", "scenario", "action", "reason", "inputs_json", "prediction_json", "current_prefill", "current_decode", "target_prefill", "target_decode", "actions", "failures", "current_mode", "target_mode")
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INPUTS_JSON_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_JSON_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PREFILL_FIELD_NUMBER: _ClassVar[int]
    CURRENT_DECODE_FIELD_NUMBER: _ClassVar[int]
    TARGET_PREFILL_FIELD_NUMBER: _ClassVar[int]
    TARGET_DECODE_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_MODE_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODE_FIELD_NUMBER: _ClassVar[int]
    time_unix: float
    scenario: str
    action: str
    reason: str
    inputs_json: str
    prediction_json: str
    current_prefill: int
    current_decode: int
    target_prefill: int
    target_decode: int
    actions: _containers.RepeatedCompositeFieldContainer[DecisionAction]
    failures: _containers.RepeatedScalarFieldContainer[str]
    current_mode: str
    target_mode: str
    def __init__(self, time_unix: _Optional[float] = ..., scenario: _Optional[str] = ..., action: _Optional[str] = ..., reason: _Optional[str] = ..., inputs_json: _Optional[str] = ..., prediction_json: _Optional[str] = ..., current_prefill: _Optional[int] = ..., current_decode: _Optional[int] = ..., target_prefill: _Optional[int] = ..., target_decode: _Optional[int] = ..., actions: _Optional[_Iterable[_Union[DecisionAction, _Mapping]]] = ..., failures: _Optional[_Iterable[str]] = ..., current_mode: _Optional[str] = ..., target_mode: _Optional[str] = ...) -> None: ...

class GetDecisionsResponse(_message.Message):
    __slots__ = ("decisions",)
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    def __init__(self, decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ...) -> None: ...
