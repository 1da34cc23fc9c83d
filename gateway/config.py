"""What `pdmesh serve --config scenarios.yaml` reads: the scenario specs (scenarios.spec, the
same file the ratio controller reads), the engine and transport options every actor shares,
the gateway's limits and the ratio controller's settings. Validated on load; errors name the field and what to fix."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mesh import Mode, resolve_device
from mesh.api import EngineConfig, engine_config, transport_config
from scenarios.autoscale import ScaleSettings
from scenarios.controller import Settings
from scenarios.perf_model import PerfModel, ProfileError, builtin, load_profile
from scenarios.spec import SLO, Hardware, ScenarioSpec, SpecError, parse_specs, read_yaml

if TYPE_CHECKING:
    from transport import TransportConfig


class Limits(BaseModel):
    """Bounds that keep one gateway process responsive under any load."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_forwards: int = Field(8, ge=1, description="prefill offers per request before RESOURCE_EXHAUSTED")
    admission_timeout_s: float = Field(5.0, gt=0, description="how long a request may wait for a prefill actor")
    request_timeout_s: float = Field(600.0, gt=0, description="longest a request may run")
    max_message_bytes: int = Field(4 << 20, ge=1024, description="largest gRPC message or HTTP body")
    max_concurrent_requests: int = Field(1024, ge=1, description="in flight at once; more get RESOURCE_EXHAUSTED")
    default_max_tokens: int = Field(256, ge=1, description="output tokens when the client gives no max_tokens")
    tokenizer_threads: int = Field(2, ge=1, description="threads that tokenize long prompts off the event loop")
    max_tokenizing: int = Field(16, ge=1, description="long prompts tokenizing or waiting for a thread at once; "
                                                      "more get RESOURCE_EXHAUSTED")
    idle_timeout_s: float = Field(30.0, gt=0, description="a connection with no request under way is closed after "
                                                          "this: idle keep-alive, or request headers (HTTP) or "
                                                          "the HTTP/2 preface (gRPC) trickled in too slowly")
    body_timeout_s: float = Field(30.0, gt=0, description="how long an HTTP request's body may take to arrive "
                                                          "(408 after)")
    max_connections: int = Field(1024, ge=1, description="open connections at once, per API; more are refused "
                                                         "(HTTP: 503)")
    max_streams_per_connection: int = Field(100, ge=1, description="concurrent gRPC calls on one connection")


class Control(BaseModel):
    """The ratio controller in the gateway (gateway.control)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="on at start; `pdmesh controller on|off` changes it live")
    profile: str = Field("small-llama-cpu", description="performance model: a built-in profile or a profile file")
    drain_timeout_s: float | None = Field(None, gt=0, description="per flip; none: the actor's default")
    settings: Settings = Settings()
    # fleet autoscaling per scenario (scenarios.autoscale), asking Ray's autoscaler for the
    # resources (gateway.scaling); none: the fleet keeps its size
    autoscale: ScaleSettings | None = None

    @field_validator("profile")
    @classmethod
    def _loads(cls, v: str) -> str:
        try:
            load_model(v)
        except ProfileError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("settings")
    @classmethod
    def _plannable(cls, v: Settings) -> Settings:
        if v.interval_s <= 0 or v.min_dwell_s < 0 or v.confirm < 1:
            raise ValueError("interval_s must be > 0, min_dwell_s >= 0 and confirm >= 1")
        if not 0 < v.utilisation <= 1 or v.sqrt_from <= 0 or v.band < 0 or v.lend_band < 0:
            raise ValueError("utilisation must be in (0, 1], sqrt_from > 0, band and lend_band >= 0")
        return v

    @field_validator("autoscale")
    @classmethod
    def _scalable(cls, v: ScaleSettings | None) -> ScaleSettings | None:
        if v is not None and not (v.correct_up >= 1 and 0 < v.correct_down <= 1 and v.correct_max >= 1
                                  and v.correct_z >= 0):
            raise ValueError("correct_up and correct_max must be >= 1, correct_down in (0, 1] and correct_z >= 0: "
                             "the correction rises on SLO misses and falls back to 1")
        return v

    def perf_model(self) -> PerfModel:
        """A fresh model: each scenario's is refined from its own pool's measurements."""
        return load_model(self.profile)


def load_model(name: str) -> PerfModel:
    return load_profile(name) if Path(name).suffix in (".yaml", ".yml", ".json") else builtin(name)


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    scenarios: tuple[ScenarioSpec, ...] = Field(min_length=1)
    engine: dict = Field(default_factory=dict, description="EngineConfig fields for every actor (not model)")
    transport: dict = Field(default_factory=dict, description="TransportConfig fields (backend, ...)")
    gateway: Limits = Limits()
    controller: Control = Control()
    served_model_name: str = Field("", description="the model name clients ask for (one model only); "
                                                   "default: the checkpoint folder's name")

    @model_validator(mode="after")
    def _one_served_name(self):
        if self.served_model_name and len({s.model for s in self.scenarios}) > 1:
            raise ValueError("served_model_name names one model, and these scenarios serve several: leave it out")
        return self

    def served_name(self, spec: ScenarioSpec) -> str:
        """The model name clients ask for: served_model_name, else the checkpoint folder's name."""
        return self.served_model_name or Path(spec.model).name

    def engine_for(self, model: str) -> EngineConfig:
        """The engine settings of a scenario's actors."""
        return engine_config({**self.engine, "model": model})

    def transport_with(self, secret: str) -> TransportConfig:
        """The transport settings of every actor, with the mesh's shared secret (made per run)."""
        return transport_config({**self.transport, "secret": secret})

    @model_validator(mode="after")
    def _typed(self) -> ServeConfig:
        """The engine and transport fields are checked here, when the file is read, rather than
        in the actors that use them."""
        self.engine_for(self.scenarios[0].model)
        self.transport_with("0" * 16)  # a placeholder of a valid length: the real one is made per run
        return self


def parse(data: object, source: str = "config") -> ServeConfig:
    specs = parse_specs(data, source)  # raises SpecError naming the scenario and field
    rest = {k: v for k, v in data.items() if k != "scenarios"}
    try:
        return ServeConfig(scenarios=tuple(specs), **rest)
    except ValidationError as e:
        raise SpecError(f"{source}: {'; '.join(map(_problem, e.errors()))}") from None


def _problem(err: dict) -> str:
    """"field: what is wrong"; a validator's own message as it wrote it (it names its fields)."""
    if err["type"] == "value_error":
        what = str(err["ctx"]["error"])
        return f"{'.'.join(map(str, err['loc']))}: {what}" if err["loc"] else what
    return f"{'.'.join(map(str, err['loc']))}: {err['msg']}"


def load(path: str | Path) -> ServeConfig:
    """Reads and validates a YAML config; raises SpecError with what to fix."""
    return parse(read_yaml(path), str(path))


def default(model: str | Path, device: str = "auto", mode: Mode | str | None = None, **rest) -> ServeConfig:
    """One scenario on `model`, in `mode`; by default what fits the host: without accelerators
    (`device` cpu, or auto finding none) one aggregated actor using all the host's cores, which
    on shared cores beats a prefill and a decode actor with half each (docs/benchmarks.md,
    "Mesh"); with accelerators one prefill and one decode actor. Each actor takes one
    accelerator when `device` names one (Ray places actors by resource)."""
    kind = device if device != "auto" else resolve_device(device).type
    mode = Mode(mode) if mode else Mode.AGGREGATED if kind == "cpu" else Mode.DISAGGREGATED
    engine = rest.pop("engine", {})
    if mode is Mode.AGGREGATED and kind == "cpu":
        # its one actor has the host to itself; Ray starts it with one OpenMP thread unless told
        engine = {"threads": len(os.sched_getaffinity(0)), **engine}
    hw = Hardware(accelerator=device, num_gpus=device == "cuda", npus=device == "npu")
    spec = ScenarioSpec(name="default", model=str(model), slo=SLO(ttft_s=2.0, tpot_s=0.2), mode=mode,
                        hardware={"prefill": hw, "decode": hw})
    return ServeConfig(scenarios=(spec,), engine=engine, **rest)
