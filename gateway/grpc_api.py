"""The gRPC front end: pdmesh.v1.Inference (server-streaming Generate), pdmesh.v1.Admin, the
standard health and reflection services; API keys checked by one interceptor, message sizes
bounded by the server, failures as the status that says what happened: a message that does not
parse is INVALID_ARGUMENT, and an internal failure INTERNAL without its details (errors.hidden);
gRPC's own answer to both would be UNKNOWN with the exception's text."""
from __future__ import annotations

import inspect
import uuid
from typing import Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway import telemetry
from gateway.auth import Keys, bearer
from gateway.config import Limits
from gateway.errors import GatewayError, hidden
from gateway.proto import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from gateway.service import GenerateCall, InferenceService

_SAMPLING_SCALARS = ("max_tokens", "temperature", "top_k", "top_p", "seed")


def sampling_of(options: inference_pb2.SamplingOptions) -> dict:
    """The SamplingParams fields the client set (unset optional fields keep the defaults)."""
    out = {name: getattr(options, name) for name in _SAMPLING_SCALARS if options.HasField(name)}
    if options.stop:
        out["stop"] = list(options.stop)
    if options.stop_token_ids:
        out["stop_token_ids"] = list(options.stop_token_ids)
    for flag in ("ignore_eos", "logprobs"):
        if getattr(options, flag):
            out[flag] = True
    if options.min_tokens:
        out["min_tokens"] = options.min_tokens
    return out


async def abort(context: grpc.aio.ServicerContext, e: GatewayError) -> None:
    trailers = (("grpc-retry-pushback-ms", str(int(e.retry_after_s * 1000))),) if e.retry_after_s else ()
    await context.abort(grpc.StatusCode[e.grpc_status_name], e.message, trailing_metadata=trailers)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, service: InferenceService):
        self.service = service

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        which = request.WhichOneof("prompt")
        call = GenerateCall(
            prompt_text=request.text if which == "text" else None,
            prompt_token_ids=tuple(request.token_ids.ids) if which == "token_ids" else None,
            sampling=sampling_of(request.sampling), scenario=request.scenario, model=request.model,
            request_id=request.request_id, time_left_s=context.time_remaining(),
            trace_parent=telemetry.client_context(context.invocation_metadata() or ()), api="grpc")
        first = True
        try:
            async for chunk in self.service.generate(call):
                reply = inference_pb2.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text,
                                                       logprobs=chunk.logprobs or (),
                                                       finish_reason=chunk.finish_reason or "")
                if first:
                    reply.request_id, reply.scenario, first = chunk.request_id, chunk.scenario, False
                if chunk.finish_reason:
                    reply.usage.prompt_tokens = chunk.prompt_tokens
                    reply.usage.completion_tokens = chunk.completion_tokens
                await context.write(reply)
        except GatewayError as e:
            await abort(context, e)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Inference calls need an API key, admin calls the admin key; health and reflection are
    open, so that probes and tools work without one."""

    def __init__(self, keys: Keys):
        self.checks: dict[str, Callable[[str | None], None]] = {
            "/pdmesh.v1.Inference/": keys.check_inference, "/pdmesh.v1.Admin/": keys.check_admin}

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        check = next((c for prefix, c in self.checks.items() if details.method.startswith(prefix)), None)
        if check is None or handler is None:
            return handler
        metadata = dict(details.invocation_metadata or ())
        try:
            check(bearer(metadata.get("authorization")))
        except GatewayError as e:
            return _refusal(handler, e)
        return _guarded(handler)


def _refusal(handler: grpc.RpcMethodHandler, e: GatewayError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only ends the call with `e`'s status."""
    async def refuse(request, context):
        await abort(context, e)

    async def refuse_stream(request, context):
        await abort(context, e)
        yield  # an async generator, as unary-stream handlers are

    args = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **args)
    return grpc.unary_unary_rpc_method_handler(refuse, **args)


def _guarded(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler`, with a request message that does not parse ended INVALID_ARGUMENT, and a
    failure the handler did not turn into a status ended INTERNAL without its details."""
    if handler.request_streaming:  # pdmesh's services have none
        return handler
    parse = handler.request_deserializer

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as e:
            return GatewayError("invalid_argument", f"the request message does not parse: {e}; send the "
                                                    "method's message type, with UTF-8 strings")

    async def guard(request, context, run):
        if isinstance(request, GatewayError):
            await abort(context, request)
        try:
            return await run()
        except grpc.aio.AbortError:
            raise  # the handler's own status
        except Exception as e:
            await abort(context, hidden(e, uuid.uuid4().hex))

    async def unary(request, context):
        return await guard(request, context, lambda: handler.unary_unary(request, context))

    async def stream(request, context):
        async def run():
            replies = handler.unary_stream(request, context)
            if inspect.isasyncgen(replies):
                async for reply in replies:
                    await context.write(reply)
            else:  # a coroutine that writes its replies itself
                await replies
        await guard(request, context, run)

    args = dict(request_deserializer=deserialize, response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **args)
    return grpc.unary_unary_rpc_method_handler(unary, **args)


def make_server(service: InferenceService, admin: admin_pb2_grpc.AdminServicer, keys: Keys,
                limits: Limits) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    idle_ms = int(limits.idle_timeout_s * 1000)
    server = grpc.aio.server(interceptors=[AuthInterceptor(keys)], options=[
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second gateway on the same port fails instead of sharing it
        # a connection that trickles its preface or sits idle is closed (GOAWAY; clients reconnect)
        ("grpc.server_handshake_timeout_ms", idle_ms),
        ("grpc.http2.settings_timeout", idle_ms),
        ("grpc.max_connection_idle_ms", idle_ms),
        ("grpc.keepalive_time_ms", 60_000),  # pings find peers gone without a word
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
    ])
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(service), server)
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
             admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    return server, health_servicer


async def set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", "pdmesh.v1.Inference"):
        await servicer.set(name, status)

