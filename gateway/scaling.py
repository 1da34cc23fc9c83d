"""Fleet autoscaling live: the autoscaler's scale steps (scenarios.autoscale) carried out on the
pools, with Ray's autoscaler asked for the resources first.

`ray.autoscaler.sdk.request_resources` is a standing request (each call replaces the last).
It holds one bundle (the role's `Hardware`: CPUs, GPUs, NPUs, custom resources) per actor the
autoscaler added and has not removed: on scale out the request grows before the actor is
placed, so that Ray's autoscaler (KubeRay's in-tree one on Kubernetes, deploy/k8s) starts
nodes for it; on scale in it shrinks after the drain, so that the idle nodes may go. An add
that fails takes its bundle back.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from typing import Callable

from mesh import Hardware, Role
from scenarios.autoscale import ScaleAction
from scenarios.connector import Connector
from scenarios.controller import Action


def bundle(hw: Hardware) -> dict[str, float]:
    """The Ray resources one actor on `hw` takes, all its tensor-parallel ranks' (what the pool asks for)."""
    return hw.bundle(hw.tensor_parallel_size or 1)


def request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources as ask

    ask(bundles=bundles)


class RayScaling:
    """A connector around the live one: adds and removes ask Ray's autoscaler for resources."""

    def __init__(self, inner: Connector, hardware: Callable[[str, Role], Hardware],
                 request: Callable[[list[dict[str, float]]], None] = request_resources):
        """hardware(scenario, role): what an actor of the role runs on there; request: tells
        Ray's autoscaler the bundles (replacing the last request)."""
        self.inner, self.hardware, self.request = inner, hardware, request
        self.added: Counter[tuple[str, Role]] = Counter()  # actors added and not removed since

    def bundles(self) -> list[dict[str, float]]:
        return [bundle(self.hardware(scenario, role)) for (scenario, role), n in sorted(self.added.items())
                for _ in range(n)]

    async def apply(self, action: Action | ScaleAction) -> None:
        key = (action.scenario, Role(action.role))
        if action.kind == "add":
            self.added[key] += 1
            await self._ask()
            try:
                await self.inner.apply(action)
            except Exception:
                self.added[key] -= 1
                await self._ask()
                raise
        elif action.kind == "remove":
            await self.inner.apply(action)
            if self.added[key] > 0:
                self.added[key] -= 1
                await self._ask()
        else:
            await self.inner.apply(action)

    async def _ask(self) -> None:
        await asyncio.to_thread(self.request, self.bundles())
