"""What one actor of a role runs on: the one value object the scenario file
(`scenarios.spec`, validated on load), the pools (`mesh.pool`, which ask Ray for it) and the
simulator share.

Frozen and Ray-free, so every layer above the mesh can import it; `options()` is the Ray
actor options it asks for, `device` the kind of device the role rule (mesh.role_limits)
checks an actor against.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mesh.role_limits import device_for


class Hardware(BaseModel):
    """`accelerator` names the perf-model profile's device (what a role's times are modelled on)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    accelerator: str = "cpu"
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    npus: float = Field(0, ge=0)
    # Custom Ray resources the node must offer, e.g. {"pdmesh_decode": 1} to place a role's
    # actors on the nodes started with that resource (a NIC, a rack, a node pool).
    resources: dict[str, float] = Field(default_factory=dict)
    # Ranks one actor's engine spans (tensor parallelism), each with the CPUs, GPUs, NPUs and
    # resources above, reserved together on one node; None: the engine config's.
    tensor_parallel_size: int | None = Field(None, ge=1)

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if not name or name in ("CPU", "GPU", "NPU", "memory") or amount < 0:
                raise ValueError(f"resource {name!r}: {amount}: name a custom Ray resource (CPU, GPU and NPU "
                                 "have fields of their own) with an amount of 0 or more")
        return v

    def options(self, ranks: int = 1) -> dict:
        """The Ray actor options of an actor whose engine spans `ranks` tensor-parallel ranks,
        each with this share: CPUs, GPUs, and the custom NPU and placement resources."""
        opts: dict = {"num_cpus": self.num_cpus * ranks}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus * ranks
        resources = {name: amount * ranks for name, amount in {**self.resources, "NPU": self.npus}.items() if amount}
        if resources:
            opts["resources"] = resources
        return opts

    def bundle(self, ranks: int = 1) -> dict[str, float]:
        """The same resources as one placement group bundle (a bundle cannot be empty: at least a
        sliver of a CPU)."""
        opts = self.options(ranks)
        bundle = {"CPU": opts["num_cpus"], "GPU": opts.get("num_gpus", 0), **opts.get("resources", {})}
        return {name: amount for name, amount in bundle.items() if amount > 0} or {"CPU": 0.01}

    @property
    def device(self) -> str:
        return device_for(self.num_gpus, self.npus)
