"""Whether Ray can place an actor now: the resources no live node has free, so that an actor
that will wait (a pending pod, in Kubernetes' words) is reported at once, with what it waits
for, rather than after its start times out.

Both read the GCS's own tables (no dashboard needed; the embedded cluster runs without one),
through Ray's developer API."""
from __future__ import annotations

import ray
from ray._private import state as ray_state

_PENDING = ("DEPENDENCIES_UNREADY", "PENDING_CREATION")


def unmet(options: dict) -> str | None:
    """What the Ray actor options (mesh.hardware.Hardware.options) ask for that no live node
    has free now, as "CPU 1 (at most 0 free on a node)"; None when some node has it all."""
    need = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    need = {name: amount for name, amount in need.items() if amount}
    free = list(ray_state.available_resources_per_node().values())
    if any(all(node.get(name, 0) >= amount for name, amount in need.items()) for node in free):
        return None
    best = {name: max((node.get(name, 0) for node in free), default=0) for name in need}
    short = [f"{name} {amount:g} (at most {best[name]:g} free on a node)" for name, amount in need.items()
             if best[name] < amount]
    # else each is free somewhere, never all on one node
    return ", ".join(short) or ", ".join(f"{name} {amount:g}" for name, amount in need.items()) + " on one node"


def placed(handle: "ray.actor.ActorHandle") -> bool:
    """Whether Ray has found the actor a node (it may still be loading its model)."""
    info = ray_state.actors(handle._actor_id.hex())
    return bool(info) and info.get("State") not in _PENDING
