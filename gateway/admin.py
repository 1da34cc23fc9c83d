"""The admin service (pdmesh.v1.Admin) for the ops CLI: the pools and their actors, and
operations on actors (flip, drain, add, remove). Needs the admin key (gateway.grpc_api)."""
from __future__ import annotations

import grpc

from gateway.errors import GatewayError
from gateway.fleet import Fleet
from gateway.grpc_api import abort
from gateway.proto import admin_pb2, admin_pb2_grpc
from mesh.actor import Role
from mesh.errors import MeshError

ROLES = tuple(r.value for r in Role if r is not Role.BOTH)


def actor_message(info: dict) -> admin_pb2.ActorInfo:
    load = info.get("load", {})
    return admin_pb2.ActorInfo(
        actor_id=info.get("actor_id", ""), scenario=info.get("scenario", ""), role=info.get("role", ""),
        state=info.get("state", ""), pid=info.get("pid", 0), node=info.get("node", ""),
        device=info.get("device", ""), model=info.get("model") or "",
        load=admin_pb2.ActorLoad(**{k: load[k] for k in admin_pb2.ActorLoad.DESCRIPTOR.fields_by_name if k in load}))


def _role(role: str) -> str:
    if role not in ROLES:
        raise GatewayError("invalid_argument", f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role


def _optional(seconds: float) -> float | None:
    if seconds < 0:
        raise GatewayError("invalid_argument", f"a timeout must be >= 0 seconds (0: the default), got {seconds}")
    return seconds or None


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    async def _run(self, context: grpc.aio.ServicerContext, op):
        """Runs `op`, answering its failures with their status and message."""
        try:
            return await op()
        except GatewayError as e:
            await abort(context, e)
        except MeshError as e:
            await abort(context, GatewayError.from_mesh(e))

    async def ListPools(self, request, context):
        async def op():
            names = [self.fleet.get(request.scenario).name] if request.scenario else list(self.fleet.scenarios)
            await self.fleet.refresh()
            return admin_pb2.ListPoolsResponse(pools=[
                admin_pb2.Pool(scenario=n, model=self.fleet.scenarios[n].spec.model,
                               actors=[actor_message(m.info) for m in self.fleet.scenarios[n].pool.members.values()])
                for n in names])
        return await self._run(context, op)

    async def FlipActor(self, request, context):
        async def op():
            role = _role(request.role)
            scenario, _ = self.fleet.find_actor(request.actor_id)
            return actor_message(await scenario.pool.flip(request.actor_id, role, _optional(request.drain_timeout_s)))
        return await self._run(context, op)

    async def DrainActor(self, request, context):
        async def op():
            scenario, _ = self.fleet.find_actor(request.actor_id)
            result = await scenario.pool.drain(request.actor_id, _optional(request.timeout_s))
            return admin_pb2.DrainActorResponse(aborted_request_ids=result["aborted"], actor=actor_message(result))
        return await self._run(context, op)

    async def AddActor(self, request, context):
        async def op():
            role = _role(request.role)
            member = await self.fleet.get(request.scenario).pool.add(role)
            return actor_message(member.info)
        return await self._run(context, op)

    async def RemoveActor(self, request, context):
        async def op():
            scenario, member = self.fleet.find_actor(request.actor_id)
            left = [m for m in scenario.pool.by_role(member.role) if m.actor_id != member.actor_id]
            if not left:
                raise GatewayError("failed_precondition", f"{request.actor_id} is the last {member.role.value} actor "
                                                          f"of scenario {scenario.name!r}: add another first")
            await scenario.pool.remove(request.actor_id, _optional(request.drain_timeout_s))
            return admin_pb2.RemoveActorResponse(actor_id=request.actor_id)
        return await self._run(context, op)
