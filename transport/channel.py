"""A TCP control channel: framed wire messages, raw bytes straight into target
buffers (``sock_recv_into``), and a timeout on every wait. Its errors name the peer's
address: across nodes, which one went away is the first thing an operator needs."""

from __future__ import annotations

import asyncio
import socket

import torch

from . import wire
from .aio import wait_for
from .base import TransferError


def _buffer(view: torch.Tensor) -> memoryview:
    return memoryview(view.numpy()).cast("B")


class Channel:
    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        try:
            host, port = sock.getpeername()[:2]
            self.peer = f"{host}:{port}"
        except OSError:  # already reset by the peer
            self.peer = "a peer that left"
        self.timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, host: str, port: int, timeout_s: float) -> Channel:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)),
                           timeout_s, f"connecting to {host}:{port}")
        except OSError as e:
            sock.close()
            raise TransferError("peer", f"cannot connect to {host}:{port}: {e}") from None
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout_s)

    async def send(self, kind: str, **fields) -> None:
        await self._sendall(memoryview(wire.encode(kind, **fields)))

    async def send_bytes(self, views: list[torch.Tensor]) -> None:
        for view in views:
            await self._sendall(_buffer(view))

    async def recv(self, expect: str, timeout_s: float | None = None) -> dict:
        """The next message, which must be ``expect``; a peer's error message
        is raised as its TransferError."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        header = bytearray(wire.HEADER.size)
        await self.recv_into(memoryview(header), timeout_s)
        try:
            body = bytearray(wire.frame_length(bytes(header)))
            await self.recv_into(memoryview(body), timeout_s)
            msg = wire.decode(bytes(body))
        except wire.WireError as e:
            raise TransferError("wire", str(e)) from None
        if msg["t"] == "error":
            raise TransferError(msg["code"], f"peer {self.peer}: {msg['message']}")
        if msg["t"] != expect:
            raise TransferError("wire", f"expected {expect}, got {msg['t']} from {self.peer}")
        return msg

    async def until_closed(self) -> None:
        """Raise once the peer closes the connection (or, out of turn, speaks):
        watched while the peer must stay silent and UCX moves its data."""
        header = bytearray(wire.HEADER.size)
        await self.recv_into(memoryview(header), None)
        raise TransferError("wire", "the peer spoke out of turn")

    async def recv_tensors(self, views: list[torch.Tensor], timeout_s: float) -> None:
        for view in views:
            await self.recv_into(_buffer(view), timeout_s)

    async def recv_into(self, buf: memoryview, timeout_s: float) -> None:
        async def fill() -> None:
            got = 0
            while got < len(buf):
                n = await self._loop.sock_recv_into(self.sock, buf[got:])
                if n == 0:
                    raise TransferError("peer", f"{self.peer} closed the connection")
                got += n
        try:
            await wait_for(fill(), timeout_s, f"waiting for {self.peer}")
        except (ConnectionError, OSError) as e:
            raise TransferError("peer", f"connection to {self.peer} lost: {e}") from None

    async def _sendall(self, buf: memoryview) -> None:
        try:
            await wait_for(self._loop.sock_sendall(self.sock, buf), self.timeout_s,
                           f"sending to {self.peer}")
        except (ConnectionError, OSError) as e:
            raise TransferError("peer", f"connection to {self.peer} lost: {e}") from None

    async def try_send_error(self, err: TransferError) -> None:
        """Tell the peer why, if it is still there; the error stands either way."""
        try:
            await asyncio.wait_for(self.send("error", code=err.code, message=str(err)), 1.0)
        except (TransferError, asyncio.TimeoutError, wire.WireError):
            pass

    def close(self) -> None:
        self.sock.close()
