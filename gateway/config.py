"""What `pdmesh serve --config scenarios.yaml` reads: the scenario specs (scenarios.spec, the
same file the ratio controller reads), the engine and transport options every actor shares,
and the gateway's limits. Validated on load; errors name the field and what to fix."""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scenarios.spec import SLO, Hardware, ScenarioSpec, SpecError, parse_specs


class Limits(BaseModel):
    """Bounds that keep one gateway process responsive under any load."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_forwards: int = Field(8, ge=1, description="prefill offers per request before RESOURCE_EXHAUSTED")
    admission_timeout_s: float = Field(5.0, gt=0, description="how long a request may wait for a prefill actor")
    request_timeout_s: float = Field(600.0, gt=0, description="longest a request may run")
    max_message_bytes: int = Field(4 << 20, ge=1024, description="largest gRPC message or HTTP body")
    max_concurrent_requests: int = Field(1024, ge=1, description="in flight at once; more get RESOURCE_EXHAUSTED")
    default_max_tokens: int = Field(256, ge=1, description="output tokens when the client gives no max_tokens")


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    scenarios: tuple[ScenarioSpec, ...] = Field(min_length=1)
    engine: dict = Field(default_factory=dict, description="EngineConfig fields for every actor (not model)")
    transport: dict = Field(default_factory=dict, description="TransportConfig fields (backend, ...)")
    gateway: Limits = Limits()

    def served_name(self, spec: ScenarioSpec) -> str:
        """The model name clients ask for: the checkpoint folder's name."""
        return Path(spec.model).name


def parse(data: object, source: str = "config") -> ServeConfig:
    specs = parse_specs(data, source)  # raises SpecError naming the scenario and field
    rest = {k: v for k, v in data.items() if k != "scenarios"}
    try:
        return ServeConfig(scenarios=tuple(specs), **rest)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise SpecError(f"{source}: {problems}") from None


def load(path: str | Path) -> ServeConfig:
    """Reads and validates a YAML config; raises SpecError with what to fix."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    return parse(data, str(path))


def default(model: str | Path, device: str = "auto", **rest) -> ServeConfig:
    """One scenario, one prefill and one decode actor, on `model`; each actor takes one
    accelerator when `device` names one (Ray places actors by resource)."""
    hw = Hardware(accelerator=device, num_gpus=device == "cuda", npus=device == "npu")
    spec = ScenarioSpec(name="default", model=str(model), slo=SLO(ttft_s=2.0, tpot_s=0.2),
                        hardware={"prefill": hw, "decode": hw})
    return ServeConfig(scenarios=(spec,), **rest)
