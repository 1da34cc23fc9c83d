"""The serving mesh: the engine and the Ray actors that run it.

This package is the mesh's public face: the gateway imports mesh only from here and from
`mesh.api` (the values that cross the boundary), as pyproject.toml's import contract checks;
`mesh.tracing` is public too (the gateway's spans parent the actors'). The names below load
on first use, so that `import mesh` loads neither torch nor Ray: the ops CLI stays fast.
"""
import importlib
import os

# torch-npu, once installed, makes `import torch` fail on hosts without CANN
# unless its autoload is off; mesh.engine.device imports it explicitly instead.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

_PUBLIC = {
    "mesh.api": ("ActorReport", "ActorRequest", "ActorSpec", "ActorState", "Committed", "DrainResult",
                 "EngineConfig", "FeedItem", "FirstToken", "Lease", "Life", "LoadReport", "OfferReply", "PrefixCacheStats",
                 "PrefixReport", "SamplingParams", "StreamChunk", "engine_config", "transport_config"),
    "mesh.roles": ("MOVABLE", "Role"),
    "mesh.errors": ("MeshError", "RequestMoved"),
    "mesh.engine.errors": ("CheckpointError", "EngineError", "RequestError"),
    "mesh.engine.model_config": ("ModelConfig",),
    "mesh.engine.sampling_params": ("MAX_TOP_LOGPROBS",),
    "mesh.dispatch": ("Dispatcher",),
    "mesh.attempt": ("Event", "Request"),
    "mesh.serving_mode": ("Mode",),
    "mesh.token_feed": ("Outbox",),
    "mesh.hardware": ("Hardware",),
    "mesh.pool": ("Member", "Pool", "PoolSpec"),
    "mesh.supervisor": ("RestartPolicy", "Supervisor"),
    "mesh.routing": ("CrossScenarioOverflow", "ForwardOnRejection", "Neighbour"),
    "mesh.role_limits": ("Change", "RoleLimitError", "device_kind"),
    "mesh.cluster": ("connect", "disconnect"),
    "mesh.bench": ("percentile",),
    "mesh.engine.tokenizer": ("Tokenizer",),
    "mesh.engine.engine": ("Engine",),
    "mesh.engine.cli": ("engine_options", "tensor_parallel_option"),
    "mesh.engine.device": ("cpu_has_fast_half", "npu_available", "resolve_device"),
    "mesh.engine.random_checkpoint": ("default_model_dir", "init_checkpoint"),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name == "tracing":
        return importlib.import_module("mesh.tracing")
    if name not in _HOME:
        raise AttributeError(f"module 'mesh' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return [*globals(), *__all__]
