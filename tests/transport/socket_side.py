"""A TCP receiver and sender in this process, a hand-driven raw client and a whole
transfer that must succeed: shared by the tests of the control protocol and of the
receiver's connection limits."""
from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

from transport import KVReceiver, KVSender, TransportConfig, make_receiver, make_sender, wire
from transport.peer import ListReserver
from tests.support.clock import FakeClock
from tests.transport.support import SECRET, assert_same_kv, filled, make_layout

LAYOUT = make_layout()
TOKENS = 20


@dataclass
class Side:
    receiver: KVReceiver
    sender: KVSender
    clock: FakeClock
    pool: object
    res: ListReserver
    dst_res: ListReserver


async def open_side(reserver, **config) -> Side:
    """A started receiver on a fake clock and a sender, both over TCP, with these
    TransportConfig changes."""
    cfg = TransportConfig(**{"backend": "tcp", "secret": SECRET, "timeout_s": 5.0, **config})
    clock = FakeClock()
    dst_res = reserver(LAYOUT)
    receiver = make_receiver(cfg, LAYOUT.allocate(), LAYOUT, dst_res, clock)
    await receiver.start()
    return Side(receiver, make_sender(cfg), clock, filled(LAYOUT, 1), reserver(LAYOUT), dst_res)


async def close_side(s: Side) -> None:
    await s.sender.close()
    await s.receiver.close()
    assert len(s.receiver.leases) == 0


async def transfer_ok(s: Side, sender=None) -> None:
    """A whole transfer that must succeed: the receiver is still usable."""
    lease = s.receiver.reserve(TOKENS)
    ids = s.res.allocate(LAYOUT.blocks_for(TOKENS))
    await (sender or s.sender).send(lease, s.pool, LAYOUT, ids)
    got = await s.receiver.wait(lease.lease_id, 5)
    assert_same_kv(s.pool, LAYOUT, ids, s.receiver.pool, LAYOUT, got.block_ids, TOKENS)
    s.res.free(ids)
    s.dst_res.free(got.block_ids)


class RawClient:
    """A hand-driven sender speaking the wire format, to send what a real one never would.
    ``source`` picks the loopback address it connects from (any of 127.0.0.0/8), so that
    tests can play several peers."""

    async def open(self, port: int, secret: str | None = SECRET,
                   source: str = "127.0.0.1") -> RawClient:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port,
                                                                 local_addr=(source, 0))
        if secret is not None:
            assert (await self.hello(secret))["t"] == "welcome"
        return self

    async def hello(self, secret: str) -> dict:
        """Answer the challenge with the token: the receiver's reply."""
        challenge = await self.recv()
        nonce = secrets.token_bytes(wire.NONCE_BYTES)
        self.send("hello", nonce=nonce, mac=wire.mac(secret.encode(), b"sender", challenge["nonce"]))
        return await self.recv()

    def send(self, kind: str, **fields) -> None:
        self.writer.write(wire.encode(kind, **fields))

    async def recv(self) -> dict:
        header = await asyncio.wait_for(self.reader.readexactly(4), 5)
        return wire.decode(await asyncio.wait_for(self.reader.readexactly(wire.frame_length(header)), 5))

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 5) == b""

    def close(self) -> None:
        self.writer.close()

    def begin(self, lease, **changes) -> None:
        fields = {"lease_id": lease.lease_id, "layout": LAYOUT.to_wire(), "block_ids": [0, 1, 2],
                  "num_tokens": lease.num_tokens, "strategy": "contiguous", "gather_threshold": 32,
                  "address": b"", **changes}
        self.send("begin", **fields)
