"""Peers in their own processes for the transfer tests (test_peers, test_paths): a
side, how it runs (backend and UCX settings), and a whole transfer checked layer by layer."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from transport.layout import KVLayout
from transport.peer import PeerProcess
from tests.transport.support import SECRET

KINDS = {"ucx-shm": ("ucx", {"UCX_TLS": "sm,self"}),
         "ucx-tcp": ("ucx", {"UCX_TLS": "tcp"}),
         "ucx": ("ucx", {}),  # whatever UCX finds here (on a GPU host: its CUDA transports)
         "tcp": ("tcp", {})}


class Side:
    """One peer process and what it was started with (config: TransportConfig changes)."""

    def __init__(self, role: str, kind: str, layout: KVLayout, seed: int = 0, **config) -> None:
        backend, env = KINDS[kind]
        self.kind, self.layout = kind, layout
        self.proc = PeerProcess(env)
        self.config = {"backend": backend, "secret": SECRET, "timeout_s": 5.0, **config}
        # started in the background: peers import torch and UCX side by side
        self.proc.submit("init", role=role, config=self.config, layout=layout.to_wire(),
                         seed=seed, fake_clock=True)

    def started(self) -> Side:
        self.proc.result()
        return self

    def call(self, cmd: str, **args):
        return self.proc.call(cmd, **args)

    def kv(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        """``[layers, 2, tokens, kv_heads, head_dim]`` in float32."""
        got = self.call("read", block_ids=block_ids, num_tokens=num_tokens)
        return torch.frombuffer(bytearray(got["data"]), dtype=torch.float32).view(got["shape"])

    def assert_clean(self) -> None:
        assert self.call("status") == {"free_blocks": self.layout.num_blocks, "leases": 0}


def transfer(recv: Side, send: Side, num_tokens: int, strategy: str = "contiguous") -> tuple[dict, dict]:
    """A whole transfer that must succeed, checked byte for byte, layer by layer; returns
    the sender's and the receiver's stats."""
    lease = recv.call("reserve", num_tokens=num_tokens)
    recv.proc.submit("wait", lease_id=lease["lease_id"], timeout_s=10)
    sent = send.call("send", lease=lease, strategy=strategy)
    got = recv.proc.result()
    want = send.kv(sent["block_ids"], num_tokens).to(recv.layout.dtype).float()
    landed = recv.kv(got["block_ids"], num_tokens)
    for layer in range(recv.layout.num_layers):
        assert torch.equal(landed[layer], want[layer]), f"layer {layer} differs"
    recv.call("free", block_ids=got["block_ids"])
    nbytes = recv.layout.num_layers * 2 * num_tokens * recv.layout.token_bytes
    assert got["stats"]["bytes"] == sent["stats"]["bytes"] == nbytes
    return sent["stats"], got["stats"]


@contextlib.contextmanager
def all_started(sides: dict[str, Side]) -> Iterator[dict[str, Side]]:
    """The sides, once every one started (they start side by side); each process closed after."""
    try:
        for side in sides.values():
            side.started()
        yield sides
    finally:
        for side in sides.values():
            side.proc.close()
