"""Live calibration of the performance model: one model per hardware profile (the
`accelerator` a scenario's Hardware names for a role), refined from what the actors of that
role measure, so that a scenario whose prefill runs on NPUs and whose decode runs on GPUs is
modelled as such: its prefill times from the NPU profile, its decode steps from the GPU's.

A role measures what it runs: prefill batches and the KV transfers it sends (prefill
actors), decode steps (decode actors). Each sample is first predicted, and the prediction's
relative error kept over the most recent samples (what `pdmesh status` shows), then learnt.
The actors measure (`mesh.api.StepSample`, the recent ones in each load report); `learn`
takes a report's samples once each (by their seq), those of the actor's role, and the gateway's
control loop calls it on every round (gateway.control).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from mesh.api import StepSample
from mesh.hardware import Hardware
from mesh.roles import Role
from scenarios.perf_model import PerfModel, RoleModels
from scenarios.spec import ScenarioSpec


@dataclass(frozen=True)
class PrefillSample:
    tokens: int  # computed in the batch
    sumsq: int  # sum of the squared prompt lengths (attention)
    seconds: float


@dataclass(frozen=True)
class DecodeSample:
    batch: int
    context_tokens: int  # in the whole batch
    seconds: float  # one step


@dataclass(frozen=True)
class TransferSample:
    ops: int
    nbytes: int
    seconds: float


Sample = PrefillSample | DecodeSample | TransferSample
_ROLE = {PrefillSample: Role.PREFILL, TransferSample: Role.PREFILL, DecodeSample: Role.DECODE}
_KIND = {"prefill": PrefillSample, "decode": DecodeSample, "transfer": TransferSample}


class Calibration:
    def __init__(self, seed: Callable[[str], PerfModel], recent: int = 200):
        """seed(accelerator): the model a hardware profile starts from (a built-in profile, a
        profile file, a bench run); called once per accelerator. recent: samples per error figure."""
        self.seed, self.recent = seed, recent
        self.models: dict[str, PerfModel] = {}
        self._errors: dict[tuple[str, type], deque[float]] = {}
        self._learnt: dict[str, int] = {}  # actor id -> the seq of the last sample learnt from it

    def model(self, accelerator: str) -> PerfModel:
        if accelerator not in self.models:
            self.models[accelerator] = self.seed(accelerator)
        return self.models[accelerator]

    def for_scenario(self, spec: ScenarioSpec) -> RoleModels:
        return RoleModels(self.model(spec.hardware[Role.PREFILL].accelerator),
                          self.model(spec.hardware[Role.DECODE].accelerator))

    def observe(self, role: Role, hardware: Hardware, sample: Sample) -> float:
        """Learns one measurement of an actor of `role` on `hardware`; returns the relative
        error the model made predicting it."""
        if _ROLE[type(sample)] is not role:
            raise ValueError(f"a {role} actor does not measure {type(sample).__name__}s: prefill actors send "
                             f"prefill and transfer samples, decode actors decode samples")
        if sample.seconds <= 0:
            raise ValueError(f"{type(sample).__name__}.seconds must be above 0, not {sample.seconds}")
        m = self.model(hardware.accelerator)
        if isinstance(sample, PrefillSample):
            predicted = m.prefill_s(sample.tokens, sample.sumsq)
            m.observe_prefill(sample.tokens, sample.sumsq, sample.seconds)
        elif isinstance(sample, DecodeSample):
            predicted = m.decode_step_s(sample.batch, sample.context_tokens)
            m.observe_decode_step(sample.batch, sample.context_tokens, sample.seconds)
        else:
            predicted = m.transfer_s(sample.ops, sample.nbytes)
            m.observe_transfer(sample.ops, sample.nbytes, sample.seconds)
        error = abs(predicted - sample.seconds) / sample.seconds
        self._errors.setdefault((hardware.accelerator, type(sample)), deque(maxlen=self.recent)).append(error)
        return error

    def learn(self, actor_id: str, role: Role, hardware: Hardware, samples: Iterable[StepSample]) -> int:
        """Learns the samples of an actor's report that were not learnt before and that its role
        measures (a decode actor that recomputes a preempted prompt runs a prefill step, which is
        not what its hardware's prefill is modelled from); returns how many."""
        last = self._learnt.get(actor_id, -1)
        new = [step for step in samples if step.seq > last]
        learnt = 0
        for step in new:
            kind = _KIND.get(step.kind)
            if kind is not None and _ROLE[kind] is role and step.seconds > 0:
                self.observe(role, hardware, kind(step.size, step.extent, step.seconds))
                learnt += 1
        if new:
            self._learnt[actor_id] = max(step.seq for step in new)
        return learnt

    def error(self, accelerator: str, kind: type) -> float | None:
        """Mean relative error of the predictions over the most recent samples of a kind
        (PrefillSample, DecodeSample, TransferSample) on an accelerator; None: none yet."""
        errors = self._errors.get((accelerator, kind))
        return sum(errors) / len(errors) if errors else None
