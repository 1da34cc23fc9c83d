"""Bounded waits: every network wait has a limit, and a wait on data that UCX
moves is tied to the control connection, which is what reports a dead peer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from .base import TransferError

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout_s: float | None, what: str,
                   lease_id: str | None = None) -> T:
    """A timeout fails the one transfer, as a TransferError that says what took long."""
    try:
        return await asyncio.wait_for(aw, timeout_s)
    except asyncio.TimeoutError:
        raise TransferError("timeout", f"{what} took longer than {timeout_s}s", lease_id) from None


async def together(*aws: Awaitable[object]) -> None:
    """Wait for all; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def guarded(aw: Awaitable[T], guard: Awaitable[object]) -> T:
    """The result of ``aw``, unless ``guard`` fails first (its error is raised).
    Whichever is left is cancelled."""
    main, watch = asyncio.ensure_future(aw), asyncio.ensure_future(guard)
    try:
        await asyncio.wait({main, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not main.done():
            watch.result()  # raises the guard's error
            raise TransferError("wire", "the peer spoke out of turn")
        return main.result()
    finally:
        for task in (main, watch):
            task.cancel()
        await asyncio.gather(main, watch, return_exceptions=True)
