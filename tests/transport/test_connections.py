"""The KV receiver's control connections under a flood, over real loopback TCP: connections
that never finish the handshake hold no authenticated slot and are closed at the handshake
timeout, one address cannot take every handshake slot, the oldest handshake makes room for a
new one, and the authenticated limit still holds. Whoever is turned away is told why, with the
limit's name. Clients play several peers by connecting from different loopback addresses."""
from __future__ import annotations

import asyncio

import pytest

from transport import TransferError, TransportConfig, make_sender
from tests.transport.socket_side import LAYOUT, RawClient, close_side, open_side, transfer_ok
from tests.transport.support import SECRET


@pytest.fixture
async def sides(reserver):
    """sides(**TransportConfig changes) -> a started receiver and sender over TCP."""
    made = []

    async def make(**config):
        made.append(await open_side(reserver, **config))
        return made[-1]

    yield make
    for s in made:
        await close_side(s)


async def idle(port: int, source: str, n: int) -> list[RawClient]:
    """n connections that take their challenge (the receiver accepted and serves them) and
    never answer it."""
    clients = [await RawClient().open(port, secret=None, source=source) for _ in range(n)]
    for c in clients:
        assert (await c.recv())["t"] == "challenge"
    return clients


async def until(condition, what: str) -> None:
    """Wait for a state the receiver reaches on its own (a closed connection's handler ends
    after its client saw the close); the bound only keeps a broken receiver from hanging."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def send_refused(side, pattern: str) -> None:
    """A real sender on a new connection is refused with this error, and the lease it
    meant to write is left alone."""
    sender = make_sender(TransportConfig(backend="tcp", secret=SECRET, timeout_s=5.0))
    lease = side.receiver.reserve(8)
    with pytest.raises(TransferError, match=pattern):
        await sender.send(lease, side.pool, LAYOUT, [0])
    await sender.close()
    assert len(side.receiver.leases) == 1
    side.receiver.abort(lease.lease_id)


async def refused(client: RawClient, code: str, *phrases: str) -> None:
    """The receiver told this client why it goes, then closed the connection."""
    reply = await client.recv()
    assert (reply["t"], reply["code"]) == ("error", code), reply
    for phrase in phrases:
        assert phrase in reply["message"], reply["message"]
    assert await client.closed()


async def test_seventy_idle_connections_do_not_stop_a_transfer(sides):
    """The issue's case with the default limits: ~70 idle connections used to take every one
    of the receiver's 64 slots, and a real sender's connection was closed unanswered. (The
    handshake timeout is long here only so that a slow machine cannot end the flood early.)"""
    side = await sides(handshake_timeout_s=60)
    flood = []
    for source, n in (("127.0.0.2", 30), ("127.0.0.3", 30), ("127.0.0.1", 10)):
        flood += await idle(side.receiver.port, source, n)
    assert side.receiver.connections().handshaking == 70
    await transfer_ok(side)
    await transfer_ok(side)
    counts = side.receiver.connections()
    assert (counts.authenticated, counts.handshaking) == (1, 70)


async def test_unauthenticated_connections_hold_no_authenticated_slot(sides):
    side = await sides(max_connections=1, handshake_timeout_s=60)
    flood = await idle(side.receiver.port, "127.0.0.2", 8)
    await transfer_ok(side)  # the one authenticated slot was still free
    assert side.receiver.connections().authenticated == 1
    for c in flood:
        c.close()


async def test_idle_handshakes_are_closed_at_the_handshake_timeout(sides):
    side = await sides(handshake_timeout_s=0.2)
    flood = await idle(side.receiver.port, "127.0.0.2", 5)
    for c in flood:  # each closed by the timeout, which says so, and not by anything else
        await refused(c, "timeout", "the handshake took longer than 0.2s")
    await until(lambda: side.receiver.connections().handshaking == 0, "the handshakes' slots free")


async def test_per_peer_limit_refuses_the_extra_connections(sides):
    side = await sides(max_handshakes_per_peer=3, handshake_timeout_s=60)
    port = side.receiver.port
    flood = await idle(port, "127.0.0.2", 3)
    extra = await RawClient().open(port, secret=None, source="127.0.0.2")
    await refused(extra, "busy", "3 connections from 127.0.0.2", "max_handshakes_per_peer=3")
    await transfer_ok(side)  # another address is not limited by this one's handshakes
    assert side.receiver.connections().handshaking_by_peer == (("127.0.0.2", 3),)

    # A real sender from an address at its limit is told why, and its lease is left alone.
    local = await idle(port, "127.0.0.1", 3)
    await send_refused(side, r"^\[busy\].*3 connections from 127\.0\.0\.1.*max_handshakes_per_peer=3")
    for c in local + flood:
        c.close()
    await until(lambda: side.receiver.connections().handshaking == 0, "the closed handshakes gone")
    await transfer_ok(side)


async def test_the_oldest_handshake_makes_room(sides):
    side = await sides(max_handshakes=4, max_handshakes_per_peer=2, handshake_timeout_s=60)
    oldest, *rest = (await idle(side.receiver.port, "127.0.0.2", 2)
                     + await idle(side.receiver.port, "127.0.0.3", 2))
    await transfer_ok(side)  # its handshake took the oldest one's slot
    await refused(oldest, "busy", "dropped", "max_handshakes=4", "the oldest makes room")
    counts = side.receiver.connections()
    assert (counts.authenticated, counts.handshaking) == (1, 3)
    for c in rest:
        c.close()


async def test_authenticated_limit_still_holds(sides):
    side = await sides(max_connections=2)
    port = side.receiver.port
    held = [await RawClient().open(port) for _ in range(2)]
    third = await RawClient().open(port, secret=None)
    assert (await third.hello(SECRET)) == {
        "t": "error", "code": "busy",
        "message": "[busy] refused: the receiver holds 2 authenticated connections "
                   "(limit max_connections=2)"}
    assert await third.closed()
    await send_refused(side, r"^\[busy\].*max_connections=2")
    held.pop().close()
    await until(lambda: side.receiver.connections().authenticated == 1, "the closed one gone")
    await transfer_ok(side)
    held.pop().close()


@pytest.mark.parametrize("fields, message", [
    ({"max_connections": 0}, "must be at least 1"),
    ({"max_handshakes_per_peer": 300}, r"max_handshakes_per_peer \(300\) cannot exceed max_handshakes \(256\)"),
    ({"handshake_timeout_s": 0}, "must be positive"),
])
def test_bad_limits(fields, message):
    with pytest.raises(ValueError, match=message):
        TransportConfig(backend="local", **fields)
