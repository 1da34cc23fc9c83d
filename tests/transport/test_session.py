"""The control protocol over real TCP sockets, sender and receiver in this process:
authentication, bad input from a raw client, peers that leave, leases that end
mid-transfer, and connection reuse. Every failure must leave both sides usable."""
from __future__ import annotations

import asyncio
import dataclasses
import struct

import pytest

from transport import TransferError, TransportConfig, make_sender, wire
from tests.transport.socket_side import LAYOUT, TOKENS, RawClient, close_side, open_side, transfer_ok


@pytest.fixture(params=["auto", "staged"])
async def side(reserver, request):
    """A started receiver on a fake clock and a sender, both over TCP; their pools' bytes
    move directly (auto, on the CPU) or through host staging on copy streams."""
    s = await open_side(reserver, path=request.param)
    yield s
    await close_side(s)


async def test_transfers_reuse_one_authenticated_connection(side):
    for _ in range(3):
        await transfer_ok(side)
    assert len(side.receiver._handlers) == 1


async def test_wrong_token_is_refused_and_the_lease_kept(side):
    intruder = make_sender(TransportConfig(backend="tcp", secret="not-the-mesh-token"))
    lease = side.receiver.reserve(TOKENS)
    with pytest.raises(TransferError, match=r"\[auth\].*sender does not hold the mesh's token"):
        await intruder.send(lease, side.pool, LAYOUT, [0, 1, 2])
    assert len(side.receiver.leases) == 1  # an intruder cannot end someone's lease
    side.receiver.abort(lease.lease_id)
    await transfer_ok(side)


async def test_sender_refuses_a_receiver_without_the_token(side):
    async def impostor(reader, writer):
        writer.write(wire.encode("challenge", nonce=b"n" * 16))
        header = await reader.readexactly(4)
        await reader.readexactly(wire.frame_length(header))
        writer.write(wire.encode("welcome", mac=b"m" * 32))
        await reader.read()  # until the sender hangs up

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    lease = side.receiver.reserve(TOKENS)
    fake = dataclasses.replace(lease, port=server.sockets[0].getsockname()[1])
    with pytest.raises(TransferError, match=r"\[auth\] receiver does not hold"):
        await side.sender.send(fake, side.pool, LAYOUT, [0, 1, 2])
    server.close()
    side.receiver.abort(lease.lease_id)
    await transfer_ok(side)


@pytest.mark.parametrize("frame, message", [
    (struct.pack("!I", 3) + b"\xc1\xc1\xc1", "malformed message"),
    (struct.pack("!I", wire.MAX_MESSAGE_BYTES + 1), "over the"),
    (wire.encode("commit", nbytes=1), "expected begin, got commit"),
])
async def test_bad_messages_get_a_clear_error(side, frame, message):
    raw = await RawClient().open(side.receiver.port)
    raw.writer.write(frame)
    reply = await raw.recv()
    assert (reply["t"], reply["code"]) == ("error", "wire") and message in reply["message"]
    assert await raw.closed()
    await transfer_ok(side)


async def test_bad_begins(side):
    lease = side.receiver.reserve(TOKENS)
    cases = [({"lease_id": "nope"}, "lease", "unknown, expired"),
             ({"num_tokens": TOKENS + 1}, "plan", "token count differs"),
             ({"layout": {**LAYOUT.to_wire(), "dtype": "int8"}}, "plan", "unsupported KV dtype"),
             ({"block_ids": [0, 1, 99]}, "plan", "source block id out of range")]
    for changes, code, message in cases:
        raw = await RawClient().open(side.receiver.port)
        raw.begin(lease, **changes)
        reply = await raw.recv()
        assert (reply["t"], reply["code"]) == ("error", code) and message in reply["message"]
        assert await raw.closed()
        if code == "plan":  # a bad begin for a real lease ends it
            assert len(side.receiver.leases) == 0
            lease = side.receiver.reserve(TOKENS)
    side.receiver.abort(lease.lease_id)
    await transfer_ok(side)


async def test_no_handshake_no_memory(side):
    raw = await RawClient().open(side.receiver.port, secret=None)
    assert (await raw.recv())["t"] == "challenge"
    lease = side.receiver.reserve(TOKENS)
    raw.begin(lease)
    reply = await raw.recv()
    assert reply["code"] == "wire" and "expected hello, got begin" in reply["message"]
    assert len(side.receiver.leases) == 1
    side.receiver.abort(lease.lease_id)


@pytest.mark.parametrize("when", ["after begin", "mid layer"])
async def test_sender_that_disconnects_frees_the_lease(side, when):
    lease = side.receiver.reserve(TOKENS)
    raw = await RawClient().open(side.receiver.port)
    raw.begin(lease)
    assert (await raw.recv())["t"] == "ready"
    if when == "mid layer":
        raw.send("layer", layer=0, nbytes=2 * TOKENS * LAYOUT.token_bytes)
        raw.writer.write(b"\0" * 100)
        await raw.writer.drain()
    raw.writer.close()
    with pytest.raises(TransferError, match="lease ended without a commit"):
        await side.receiver.wait(lease.lease_id, 5)
    assert len(side.dst_res.free_ids) == LAYOUT.num_blocks
    await transfer_ok(side)


async def test_layer_sizes_must_match_the_plan(side):
    lease = side.receiver.reserve(TOKENS)
    raw = await RawClient().open(side.receiver.port)
    raw.begin(lease)
    await raw.recv()
    raw.send("layer", layer=0, nbytes=1)
    reply = await raw.recv()
    assert reply["code"] == "wire" and "the plan says otherwise" in reply["message"]
    assert len(side.receiver.leases) == 0


@pytest.mark.parametrize("end", ["receiver abort", "expiry", "sender abort", "receiver closes"])
async def test_lease_that_ends_mid_transfer(side, end):
    lease = side.receiver.reserve(TOKENS, ttl_s=10)
    ids = side.res.allocate(3)
    transfer = await side.sender.start(lease, side.pool, LAYOUT, ids)
    transfer.layer_ready(0)
    waiting = asyncio.ensure_future(side.receiver.wait(lease.lease_id, 5))
    if end == "receiver abort":
        side.receiver.abort(lease.lease_id)
    elif end == "expiry":
        side.clock.now = 10
        side.receiver.expire()
    elif end == "sender abort":
        await transfer.abort()
    else:
        await side.receiver.close()
    if end != "sender abort":
        for layer in range(1, LAYOUT.num_layers):
            transfer.layer_ready(layer)
        with pytest.raises(TransferError, match=r"\[peer\]"):
            await transfer.finish(5)
    with pytest.raises(TransferError, match="lease ended without a commit"):
        await waiting
    side.res.free(ids)
    while side.receiver.leases.draining:  # its receiving task is stopping
        await asyncio.sleep(0.01)
    assert len(side.dst_res.free_ids) == LAYOUT.num_blocks
    if end != "receiver closes":
        await transfer_ok(side)


async def test_sender_stops_before_a_lease_runs_out(side):
    lease = side.receiver.reserve(TOKENS, ttl_s=0.05)  # on the fake clock: never expires here
    with pytest.raises(TransferError, match="lease expires before the KV is written"):
        await side.sender.send(lease, side.pool, LAYOUT, [0, 1, 2])
    with pytest.raises(TransferError, match="lease ended without a commit"):
        await side.receiver.wait(lease.lease_id, 5)  # the sender hung up: the lease ends
    await transfer_ok(side)


async def test_idle_connection_closed_by_the_receiver_is_replaced(side):
    await transfer_ok(side)
    for handler in list(side.receiver._handlers):  # as when it idles too long
        handler.cancel()
    while side.receiver._handlers:
        await asyncio.sleep(0.01)
    await transfer_ok(side)  # on a new connection, transparently
