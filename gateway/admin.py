"""The admin service (pdmesh.v1.Admin) for the ops CLI: the pools and their actors,
operations on actors (flip, drain, add, remove), and the ratio controller (on/off, pins,
its decisions). Needs the admin key (gateway.grpc_api).

Operations on actors keep the role limits and hardware rules (mesh.role_limits): a refusal
answers FAILED_PRECONDITION; a forced change that broke them answers with the trailing
metadata "pdmesh-warning".

Each operation that changes something (flip, drain, add, remove, ratio set/auto, controller
on/off) logs one audit line (logger pdmesh.audit): who (the admin key's name, or the local
credential), from which peer, what, and how it ended. The local credential
(gateway.local_admin) is refused from any peer but loopback."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging

import grpc

from gateway import local_admin
from gateway.auth import Keys, bearer
from gateway.control import ControlLoop, Record, ScenarioState
from gateway.errors import GatewayError
from gateway.fleet import Fleet, Scenario
from gateway.grpc_api import abort
from gateway.ops_client import WARNING_KEY
from gateway.proto import admin_pb2, admin_pb2_grpc
from mesh import MOVABLE, ActorReport, Change, Member, MeshError, Mode, Role, RoleLimitError
from scenarios.controller import Action, Decision
from scenarios.mode_policy import ModeDecision

log = logging.getLogger(__name__)
audit = logging.getLogger("pdmesh.audit")
ROLES = tuple(r.value for r in Role)


def actor_message(info: ActorReport, waiting_for: str | None = None) -> admin_pb2.ActorInfo:
    """`waiting_for`: a starting actor is pending on these Ray resources (mesh.placement)."""
    return admin_pb2.ActorInfo(
        actor_id=info.actor_id, scenario=info.scenario, role=info.role.value,
        state="pending" if waiting_for else info.state.value, pid=info.pid, node=info.node or "",
        device=info.device or "", model=info.model or "", waiting_for=waiting_for or "",
        load=admin_pb2.ActorLoad(**{k: getattr(info.load, k) for k in admin_pb2.ActorLoad.DESCRIPTOR.fields_by_name}))


def member_message(member: Member) -> admin_pb2.ActorInfo:
    return actor_message(member.info, member.waiting_for)


def _role(role: str) -> Role:
    if role not in ROLES:
        raise GatewayError("invalid_argument", f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return Role(role)


def _fits_mode(scenario: Scenario, role: Role, what: str) -> None:
    """Refuses a role the scenario's pool does not serve with in its mode now (mesh.serving_mode:
    it would sit idle, or serve beside the mode's plan), and any change while the pool switches
    modes (the switch's own flips are under way). Not forcible: no limit is at stake."""
    pool, name = scenario.pool, scenario.name
    if pool.switching:
        raise GatewayError("failed_precondition", f"cannot {what}: scenario {name!r} is switching to {pool.mode} "
                                                  "mode, its actors flipping one at a time: try again once "
                                                  "`pdmesh status` no longer shows it switching")
    if role in pool.mode.roles:
        return
    use = " or ".join(r.value for r in pool.mode.roles)
    if scenario.spec.mode is not Mode.AUTO:
        other = "aggregated or auto" if pool.mode is Mode.DISAGGREGATED else "auto or disaggregated"
        why = f"is {pool.mode}, its actors serving as {use}; use {use}, or set mode: {other} in its scenario file"
    elif pool.mode is Mode.AUTO:
        why = (f"serves in auto mode now, its actors serving as {use} (the controller aggregates it while the "
               f"load is light); use {use}")
    else:
        why = ("serves aggregated now, its actors running whole requests as both (its mode is auto: the "
               "controller splits it again under load); use both")
    raise GatewayError("failed_precondition", f"cannot {what}: scenario {name!r} {why}")


def _optional(seconds: float) -> float | None:
    if seconds < 0:
        raise GatewayError("invalid_argument", f"a timeout must be >= 0 seconds (0: the default), got {seconds}")
    return seconds or None


def control_message(s: ScenarioState) -> admin_pb2.ScenarioControl:
    o = s.observed
    observed = admin_pb2.ObservedLoad(arrival_rps=o.arrival_rps, mean_prompt_tokens=o.mean_prompt,
                                      mean_output_tokens=o.mean_output, requests_ended=o.requests_ended,
                                      ttft_target_s=s.slo.ttft_s, tpot_target_s=s.slo.tpot_s,
                                      slo_percentile=s.slo.percentile)
    if o.ttft_attainment is not None:
        observed.ttft_attainment = o.ttft_attainment
    if o.tpot_attainment is not None:
        observed.tpot_attainment = o.tpot_attainment
    limits = {role: admin_pb2.RoleLimits(min=lim.min, max=lim.max) for role, lim in s.limits.items()}
    errors = {f"{role}_model_error": e for role, e in zip(MOVABLE, s.model_error) if e is not None}
    return admin_pb2.ScenarioControl(
        scenario=s.scenario, enabled=s.enabled, pinned=s.pin is not None, target_prefill=s.target[0],
        target_decode=s.target[1], prefill=s.current[0], decode=s.current[1], prefill_limits=limits["prefill"],
        decode_limits=limits["decode"], observed=observed, mode=s.mode.value, configured_mode=s.configured_mode.value,
        switching=s.switching, both=s.both, **errors)


def decision_message(r: Record) -> admin_pb2.Decision:
    """A ratio controller's decision, an autoscaler's scale step (its inputs: the forecast), or
    a mode switch (its target split: the prefill actors it keeps, the rest decode)."""
    d = r.decision
    if isinstance(d, ModeDecision):
        return admin_pb2.Decision(
            time_unix=d.time, scenario=d.scenario, action="switch", reason=d.reason, inputs_json=json.dumps(d.inputs),
            prediction_json="{}", target_prefill=d.prefill, target_decode=d.inputs["actors"] - d.prefill if d.prefill
            else 0, current_mode=d.current.value, target_mode=d.target.value, failures=r.failures)
    inputs, prediction = ((d.inputs, d.prediction) if isinstance(d, Decision)
                          else ({"forecast_rps": d.forecast_rps}, {}))
    return admin_pb2.Decision(
        time_unix=d.time, scenario=d.scenario, action=d.actions[0].kind if d.actions else "", reason=d.reason,
        inputs_json=json.dumps(inputs), prediction_json=json.dumps(prediction), current_prefill=d.current[0],
        current_decode=d.current[1], target_prefill=d.target[0], target_decode=d.target[1],
        actions=[admin_pb2.DecisionAction(kind=a.kind, actor_id=a.actor_id or "", scenario=a.scenario, role=a.role,
                                          to_scenario=a.to_scenario or "" if isinstance(a, Action) else "") for a in d.actions],
        failures=r.failures)


def _loopback(peer: str) -> bool:
    """Whether a gRPC peer ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") is this host."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    host = rest.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _forced(request) -> str:
    return " --force" if request.force else ""


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, fleet: Fleet, control: ControlLoop, keys: Keys):
        self.fleet, self.control, self.keys = fleet, control, keys
        self.pending: dict[str, asyncio.Task] = {}  # actor id -> the start of an added actor Ray cannot place yet

    def _who(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's admin key's name (the interceptor has checked the key already)."""
        metadata = dict(context.invocation_metadata() or ())
        name = self.keys.admin_name(bearer(metadata.get("authorization")))
        if name == local_admin.NAME and not _loopback(context.peer()):
            raise GatewayError("permission_denied", "the local admin credential works on the gateway's own host "
                                                    "only: from elsewhere, use an admin key (--admin-key)")
        return name

    def _status(self) -> admin_pb2.ControllerStatus:
        return admin_pb2.ControllerStatus(scenarios=[control_message(s) for s in self.control.states()],
                                          interval_s=self.control.interval_s)

    async def _run(self, context: grpc.aio.ServicerContext, op, action: str | None = None):
        """Runs `op`, answering its failures with their status and message; an `action` (what
        it changes) gets its audit line."""
        try:
            who = self._who(context)
        except GatewayError as e:
            await abort(context, e)
        try:
            reply = await op()
        except Exception as e:
            error = self._error(e)
            if action:
                audit.info("%s from %s: %s: refused (%s: %s)", who, context.peer(), action, error.code, error.message)
            await abort(context, error)
        if action:
            audit.info("%s from %s: %s: done", who, context.peer(), action)
        return reply

    @staticmethod
    def _error(e: Exception) -> GatewayError:
        if isinstance(e, GatewayError):
            return e
        if isinstance(e, MeshError):
            return GatewayError.from_mesh(e)
        if isinstance(e, RoleLimitError):
            return GatewayError("failed_precondition", f"{e}; or force it (--force)")
        # a bug or an unexpected Ray failure: one line for the client, the rest logged
        log.error("admin operation failed", exc_info=e)
        return GatewayError("internal", "the operation failed unexpectedly; the gateway's log has the details")

    @staticmethod
    def _warn(context: grpc.aio.ServicerContext, warning: str | None) -> None:
        if warning:
            context.set_trailing_metadata(((WARNING_KEY, warning),))

    async def ListPools(self, request, context):
        async def op():
            names = [self.fleet.get(request.scenario).name] if request.scenario else list(self.fleet.scenarios)
            await self.fleet.refresh()
            pools = [self.fleet.scenarios[n] for n in names]
            return admin_pb2.ListPoolsResponse(pools=[
                admin_pb2.Pool(scenario=s.name, model=s.spec.model, actors=[
                    member_message(m) for m in (*s.pool.members.values(), *s.pool.offline.values())])
                for s in pools])
        return await self._run(context, op)

    async def FlipActor(self, request, context):
        async def op():
            role = _role(request.role)
            scenario, _ = self.fleet.find_actor(request.actor_id)
            _fits_mode(scenario, role, f"flip {request.actor_id} to {role}")
            result = await scenario.pool.flip(request.actor_id, role, _optional(request.drain_timeout_s), request.force)
            self._warn(context, result.warning)
            return actor_message(result.report)
        return await self._run(context, op, f"flip {request.actor_id} to {request.role}{_forced(request)}")

    async def DrainActor(self, request, context):
        async def op():
            scenario, _ = self.fleet.find_actor(request.actor_id)
            result = await scenario.pool.drain(request.actor_id, _optional(request.timeout_s), request.force)
            self._warn(context, result.warning)
            return admin_pb2.DrainActorResponse(moved_request_ids=result.moved, actor=actor_message(result.report))
        return await self._run(context, op, f"drain {request.actor_id}{_forced(request)}")

    async def AddActor(self, request, context):
        async def op():
            role = _role(request.role)
            scenario = self.fleet.get(request.scenario)
            _fits_mode(scenario, role, f"add a {role} actor to {request.scenario}")
            pool = scenario.pool
            self._warn(context, pool.guard(f"add a {role} actor to {request.scenario}", Change("(new)", None, role),
                                           request.force))
            return await self._add(pool, role)
        return await self._run(context, op, f"add a {request.role} actor to {request.scenario}{_forced(request)}")

    async def _add(self, pool, role: str) -> admin_pb2.ActorInfo:
        """Answers once the actor serves; or at once, as pending, when Ray has no node for it:
        its start goes on here, and `pdmesh remove` cancels it."""
        created = asyncio.get_running_loop().create_future()
        start = asyncio.create_task(pool.add(role, created=created.set_result))
        await asyncio.wait([start, created], return_when=asyncio.FIRST_COMPLETED)
        member = created.result() if created.done() else None
        if member is None or member.waiting_for is None:
            return member_message(await start)
        self.pending[member.actor_id] = start
        start.add_done_callback(lambda task: self._started(member.actor_id, task))
        log.warning("pool %s: %s is pending: no node has %s free", pool.spec.scenario, member.actor_id,
                    member.waiting_for)
        return member_message(member)

    def _started(self, actor_id: str, task: asyncio.Task) -> None:
        self.pending.pop(actor_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("the pending actor %s did not start: %s", actor_id, task.exception())

    async def RemoveActor(self, request, context):
        async def op():
            start = self.pending.get(request.actor_id)
            if start is not None:  # pending: cancelling its start kills it (mesh.pool.Pool.add)
                start.cancel()
                await asyncio.wait([start])
                return admin_pb2.RemoveActorResponse(actor_id=request.actor_id)
            scenario, _ = self.fleet.find_actor(request.actor_id)
            result = await scenario.pool.remove(request.actor_id, _optional(request.drain_timeout_s), request.force)
            self._warn(context, result.warning)
            return admin_pb2.RemoveActorResponse(actor_id=request.actor_id)
        return await self._run(context, op, f"remove {request.actor_id}{_forced(request)}")

    async def SetRatio(self, request, context):
        async def op():
            if request.auto:
                self.control.auto(request.scenario)
            else:
                self.control.set_ratio(request.scenario, request.prefill, request.decode)
            return self._status()
        what = "auto" if request.auto else f"set {request.prefill}:{request.decode}"
        return await self._run(context, op, f"ratio {what} {request.scenario}")

    async def SetController(self, request, context):
        async def op():
            self.control.set_enabled(request.scenario, request.enabled)
            return self._status()
        return await self._run(context, op, f"controller {'on' if request.enabled else 'off'} "
                                            f"{request.scenario or '(every scenario)'}")

    async def GetController(self, request, context):
        async def op():
            return self._status()
        return await self._run(context, op)

    async def GetDecisions(self, request, context):
        async def op():
            records = self.control.decisions(request.scenario, request.limit or 100)
            return admin_pb2.GetDecisionsResponse(decisions=[decision_message(r) for r in records])
        return await self._run(context, op)
