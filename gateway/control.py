"""The ratio controller (scenarios.controller) running live in the gateway process.

Every interval it closes the gateway's load window (gateway.observe) into one observation
per controlled scenario, with each actor's role and load from the pools, steps the
controller, and applies its decisions through the live connector (flip in place, lend
between pools): the round of scenarios.control_round, which the simulator runs too. Each decision goes to the decision log with what became of its actions,
to a span, and to pdmesh_controller_decisions_total. With `autoscale` configured, the
autoscaler's scale steps follow in the same round (gateway.scaling asks Ray's autoscaler for
their resources) and go to the decision log too. The mode policy's switches of auto
scenarios (scenarios.mode_policy) come first in the round; each goes to the decision log, a
`controller.mode_switch` span and the log.

Operators switch it on or off per scenario and pin ratios. A pin holds whether or not the
controller is on for its scenario (an operator's explicit order); off only stops the moves
the load would ask for. A disabled, unpinned scenario is not observed at all, so that it
neither lends nor borrows actors.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

from opentelemetry import trace

from gateway.config import Control
from gateway.errors import GatewayError
from gateway.fleet import Fleet
from gateway.metrics import Metrics
from gateway.observe import Figures, LoadWindow
from mesh import ActorState, Mode, Role, device_kind, tracing
from gateway.scaling import RayScaling, request_resources
from scenarios.autoscale import Autoscaler, ScaleDecision
from scenarios.calibration import Calibration, DecodeSample, PrefillSample
from scenarios.connector import LiveConnector
from scenarios.control_round import ControlRound, Record
from scenarios.controller import ActorView, Decision, RatioController
from scenarios.mode_policy import ModeDecision, ModePolicy
from scenarios.spec import SLO, RoleLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScenarioState:
    scenario: str
    enabled: bool
    pin: tuple[int, int] | None
    current: tuple[int, int]  # prefill, decode: by the role each actor serves or drains toward
    target: tuple[int, int]  # the pin, or where the last decision took it (else current)
    limits: dict[str, RoleLimits]
    slo: SLO
    observed: Figures
    model_error: tuple[float | None, float | None] = (None, None)  # prefill, decode (gateway.control.model_error)
    mode: Mode = Mode.DISAGGREGATED  # how the pool serves now (mesh.serving_mode)
    configured_mode: Mode = Mode.DISAGGREGATED  # the scenario file's: auto moves between auto and aggregated
    switching: bool = False  # the pool's actors are flipping to `mode`
    both: int = 0  # actors running whole requests


class ControlLoop(ControlRound):
    """The shared round (scenarios.control_round) on the live fleet, with spans, metrics, a
    timer and operator controls around it."""

    def __init__(self, fleet: Fleet, window: LoadWindow, metrics: Metrics, config: Control,
                 clock: Callable[[], float] = time.time, log_size: int = 1000,
                 request_resources: Callable[[list[dict[str, float]]], None] = request_resources):
        """clock: wall time, as decisions are shown to operators beside dashboards and logs;
        request_resources: how the autoscaler's resources are asked of Ray (gateway.scaling)."""
        specs = [s.spec for s in fleet.scenarios.values()]
        # one model per accelerator, learnt from the actors' measurements on every round
        self.calibration = Calibration(lambda accelerator: config.perf_model())
        controller = RatioController(specs, {s.name: self.calibration.for_scenario(s) for s in specs},
                                     config.settings)
        connector = LiveConnector({name: s.pool for name, s in fleet.scenarios.items()}, config.drain_timeout_s)
        autoscaler = None
        if config.autoscale is not None:
            autoscaler = Autoscaler(controller, config.autoscale)
            connector = RayScaling(connector, lambda name, role: fleet.get(name).spec.hardware[role],
                                   request_resources)
        super().__init__(controller, window, connector, clock, log_size, autoscaler,
                         modes=ModePolicy(specs, {s.name: config.perf_model() for s in specs}))
        self.fleet, self.metrics = fleet, metrics
        self.enabled = {name: config.enabled for name in fleet.scenarios}
        self._wake = asyncio.Event()
        self._tick_lock = asyncio.Lock()

    @property
    def interval_s(self) -> float:
        return self.controller.settings.interval_s

    async def run(self) -> None:
        """Ticks every interval, or at once when an operator's change wakes it, until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.tick()
            except Exception:  # one failed round (an actor gone mid-refresh); the next one tries again
                log.exception("ratio controller round failed")

    async def tick(self) -> list[Decision]:
        """One control interval: observe, decide, apply (one round at a time)."""
        async with self._tick_lock:
            self.learn()
            controlled = [n for n in self.fleet.scenarios if self.enabled[n] or n in self.controller.pins]
            return [r.decision for r in await self.round({n: self._views(n) for n in controlled})]

    def learn(self) -> None:
        """The calibration learns what each actor measured since the last round (its last report)."""
        for s in self.fleet.scenarios.values():
            for m in s.pool.members.values():
                if m.role is not Role.BOTH:
                    self.calibration.learn(m.actor_id, m.role, s.spec.hardware[m.role], m.info.load.samples)

    def model_error(self, spec) -> tuple[float | None, float | None]:
        """The model's mean relative error on the recent prefill steps of the scenario's prefill
        hardware and decode steps of its decode hardware (None: no measurement yet)."""
        return (self.calibration.error(spec.hardware[Role.PREFILL].accelerator, PrefillSample),
                self.calibration.error(spec.hardware[Role.DECODE].accelerator, DecodeSample))

    def _views(self, scenario: str) -> tuple[ActorView, ...]:
        views = []
        for m in self.fleet.scenarios[scenario].pool.members.values():
            load = m.info.load
            views.append(ActorView(m.actor_id, m.role, load.queued_requests + load.active_requests,
                                   m.info.state is ActorState.SERVING, device_kind(m.info.device or "")))
        return tuple(views)

    async def apply(self, decision: Decision) -> Record:
        tracer = trace.get_tracer("pdmesh")
        with tracer.start_as_current_span("controller.decision", end_on_exit=False) as span:
            span.set_attributes({
                "pdmesh.scenario": decision.scenario, "pdmesh.reason": decision.reason,
                "pdmesh.current": f"{decision.current[0]}P:{decision.current[1]}D",
                "pdmesh.target": f"{decision.target[0]}P:{decision.target[1]}D",
                "pdmesh.actions": [f"{a.kind} {a.actor_id} -> {a.role}" + (f" in {a.to_scenario}" if a.to_scenario
                                                                           else "") for a in decision.actions],
                "pdmesh.inputs": json.dumps(decision.inputs), "pdmesh.prediction": json.dumps(decision.prediction)})
            for a in decision.actions:
                self.metrics.decisions.labels(a.scenario, a.kind, a.role).inc()
            record = await super().apply(decision)
            for failure in record.failures:
                span.add_event("action_failed", {"pdmesh.failure": failure})
                log.warning("ratio controller: %s", failure)
            log.info("ratio controller: %s: %s", decision.scenario, decision.reason)
            tracing.end(span, RuntimeError("; ".join(record.failures)) if record.failures else None)
        return record

    async def switch(self, decision: ModeDecision) -> Record:
        tracer = trace.get_tracer("pdmesh")
        with tracer.start_as_current_span("controller.mode_switch", end_on_exit=False) as span:
            span.set_attributes({"pdmesh.scenario": decision.scenario, "pdmesh.reason": decision.reason,
                                 "pdmesh.current": str(decision.current), "pdmesh.target": str(decision.target),
                                 "pdmesh.inputs": json.dumps(decision.inputs)})
            record = await super().switch(decision)
            for failure in record.failures:
                log.warning("mode policy: %s", failure)
            log.info("mode policy: %s: %s", decision.scenario, decision.reason)
            tracing.end(span, RuntimeError("; ".join(record.failures)) if record.failures else None)
        return record

    async def scale(self, decision: ScaleDecision) -> Record:
        record = await super().scale(decision)
        for failure in record.failures:
            log.warning("autoscaler: %s", failure)
        log.info("autoscaler: %s: %s", decision.scenario, decision.reason)
        return record

    # -- operator controls -----------------------------------------------------------------
    def set_ratio(self, scenario: str, prefill: int, decode: int) -> None:
        """Pins the ratio; each count must lie within the scenario's limits for its role."""
        spec = self.fleet.get(scenario).spec
        if not self.modes.ratio_controlled(scenario):
            raise GatewayError("failed_precondition", f"scenario {scenario!r} is aggregated: its actors run whole "
                                                      "requests, there is no prefill:decode ratio to set")
        if prefill + decode == 0:
            raise GatewayError("invalid_argument", "a ratio needs at least one actor: both counts are 0")
        for role, n in (("prefill", prefill), ("decode", decode)):
            lim = spec.limits[role]
            if not lim.min <= n <= lim.max:
                raise GatewayError("invalid_argument", f"{role} {n} is outside scenario {scenario!r}'s limits "
                                                       f"[{lim.min}, {lim.max}] for {role}")
        self.controller.pin(scenario, prefill, decode)
        self._wake.set()

    def auto(self, scenario: str) -> None:
        """The controller sets the scenario's ratio from its load again."""
        self.fleet.get(scenario)
        self.controller.unpin(scenario)
        self.enabled[scenario] = True
        self._wake.set()

    def set_enabled(self, scenario: str, enabled: bool) -> None:
        """One scenario, or every one for ""."""
        for name in [self.fleet.get(scenario).name] if scenario else list(self.enabled):
            self.enabled[name] = enabled

    def states(self) -> list[ScenarioState]:
        out = []
        for name, s in self.fleet.scenarios.items():
            roles = [m.role for m in s.pool.members.values()]
            current = roles.count(Role.PREFILL), roles.count(Role.DECODE)
            pin = self.controller.pins.get(name)
            last = next((r.decision.target for r in reversed(self.records) if r.decision.scenario == name), None)
            out.append(ScenarioState(name, self.enabled[name], pin, current, pin or last or current,
                                     dict(s.spec.limits), s.spec.slo, self.window.last[name], self.model_error(s.spec),
                                     s.pool.mode, s.spec.mode, s.pool.switching, roles.count(Role.BOTH)))
        return out

    def decisions(self, scenario: str = "", limit: int = 100) -> list[Record]:
        """Newest last, the autoscaler's scale steps and the mode switches among them; for a
        scenario, its own decisions and the lends it received."""
        if scenario:
            self.fleet.get(scenario)
        records = sorted([*self.records, *self.scale_records, *self.mode_records], key=lambda r: r.decision.time)
        picked = [r for r in records if not scenario or r.decision.scenario == scenario
                  or isinstance(r.decision, Decision) and any(a.to_scenario == scenario for a in r.decision.actions)]
        return picked[-limit:]
