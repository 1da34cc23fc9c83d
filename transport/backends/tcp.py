"""TCP data plane: each layer follows a small header on the control
connection, read with ``recv_into`` straight into the target buffers."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..base import TransferError
from ..channel import Channel
from ..plan import TransferPlan
from ..session import DataPlane, RecvLink, SendLink


class TcpSendLink(SendLink):
    async def send_layer(self, ch: Channel, layer: int, bufs: list[torch.Tensor]) -> None:
        await ch.send("layer", layer=layer, nbytes=sum(b.numel() for b in bufs))
        await ch.send_bytes(bufs)


class TcpRecvLink(RecvLink):
    async def run(self, ch: Channel, plan: TransferPlan, bufs: list[list[torch.Tensor]],
                  on_layer: Callable[[int], None], timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        pending = set(range(len(bufs)))
        while pending:
            msg = await ch.recv("layer", max(0.0, deadline - time.monotonic()))
            layer = msg["layer"]
            if layer not in pending:
                raise TransferError("wire", f"layer {layer} is out of range or repeated")
            if msg["nbytes"] != sum(b.numel() for b in bufs[layer]):
                raise TransferError("wire", f"layer {layer} has {msg['nbytes']} bytes, "
                                    "the plan says otherwise")
            await ch.recv_tensors(bufs[layer], max(0.0, deadline - time.monotonic()))
            pending.discard(layer)
            on_layer(layer)
        return await ch.recv("commit", max(0.0, deadline - time.monotonic()))


class TcpPlane(DataPlane):
    name = "tcp"

    async def open_send(self, peer_address: bytes, tag_base: int) -> SendLink:
        return TcpSendLink()

    async def open_recv(self, peer_address: bytes, tag_base: int,
                        bufs: list[list[torch.Tensor]]) -> RecvLink:
        # Bytes are read inside the receiver's task: cancelling it stops them.
        return TcpRecvLink()
