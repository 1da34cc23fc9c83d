"""A KV peer in its own process, driven over stdin/stdout with length-prefixed
msgpack: a real sender or receiver for benchmarks and tests (UCX settings such
as UCX_TLS must be in its environment before ucxx starts).

Run as ``python -m transport.peer``; ``PeerProcess`` drives one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgpack
import numpy as np
import torch

from .backends import make_receiver, make_sender
from .base import LeaseDescriptor, TransferError, TransferStats
from .config import TransportConfig
from .heads import parts, sending_ranks
from .layout import KVLayout, layer_tokens

_HEADER = struct.Struct("!I")


def _write(stream, obj) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    stream.write(_HEADER.pack(len(body)) + body)
    stream.flush()


def _read(stream):
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("peer closed its pipe")
    return msgpack.unpackb(stream.read(_HEADER.unpack(header)[0]), raw=False)


class ListReserver:
    """A free list handed out in order: sorted gives contiguous runs, shuffled
    gives a fragmented pool (the engine's block manager stands in here)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free_ids = list(range(num_blocks))

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise RuntimeError(f"{n} blocks asked, {len(self.free_ids)} free")
        out, self.free_ids = self.free_ids[:n], self.free_ids[n:]
        return out

    def free(self, block_ids: list[int]) -> None:
        if len(set(block_ids)) != len(block_ids) or set(block_ids) & set(self.free_ids):
            raise RuntimeError(f"freeing blocks that are already free: {block_ids}")
        self.free_ids.extend(block_ids)

    def order(self, seed: int | None) -> None:
        """Sort the free list (None) or shuffle it with this seed."""
        self.free_ids.sort()
        if seed is not None:
            self.free_ids = np.random.default_rng(seed).permutation(self.free_ids).tolist()


def read_tokens(pool: torch.Tensor, layout: KVLayout, block_ids: list[int],
                num_tokens: int) -> torch.Tensor:
    """A request's KV in token order, ``[layers, 2, tokens, kv_heads, head_dim]``."""
    t = torch.arange(num_tokens)
    slots = torch.tensor(block_ids)[t // layout.block_size] * layout.block_size + t % layout.block_size
    return torch.stack([torch.stack([layer_tokens(pool, i, kv)[slots] for kv in (0, 1)])
                        for i in range(layout.num_layers)])


class _Peer:
    def __init__(self) -> None:
        self.now = 0.0
        self.transfer = None
        self.sending: list[int] = []
        self.layers_ready = 0

    async def init(self, role: str, config: dict, layout: dict, seed: int = 0,
                   fake_clock: bool = False) -> dict:
        self.config = TransportConfig(**config)
        self.layout = KVLayout.from_wire(layout)
        self.reserver = ListReserver(self.layout.num_blocks)
        self.pool = self.layout.allocate()
        if role == "sender":
            gen = torch.Generator().manual_seed(seed)
            self.pool.copy_(torch.randn(self.layout.shape, generator=gen))
            self.sender = make_sender(self.config)
            return {}
        clock = (lambda: self.now) if fake_clock else time.monotonic
        self.receiver = make_receiver(self.config, self.pool, self.layout, self.reserver, clock)
        await self.receiver.start()
        return {"port": self.receiver.port}

    async def order(self, seed: int | None = None) -> dict:
        self.reserver.order(seed)
        return {}

    async def reserve(self, num_tokens: int, ttl_s: float | None = None) -> dict:
        return self.receiver.reserve(num_tokens, ttl_s).to_wire()

    async def wait(self, lease_id: str, timeout_s: float) -> dict:
        got = await self.receiver.wait(lease_id, timeout_s)
        return {"block_ids": got.block_ids, "stats": got.stats.to_dict()}

    async def abort(self, lease_id: str) -> dict:
        return {"aborted": self.receiver.abort(lease_id)}

    async def start(self, lease: dict, strategy: str = "contiguous", layers: int = 0) -> dict:
        """Start a transfer with its first ``layers`` ready; ``finish`` sends the rest."""
        desc = LeaseDescriptor.from_wire(lease)
        self.sending = self.reserver.allocate(self.layout.blocks_for(desc.num_tokens))
        try:
            self.transfer = await self.sender.start(desc, self.pool, self.layout, self.sending,
                                                    strategy)
        except BaseException:
            self._release()
            raise
        for layer in range(layers):
            self.transfer.layer_ready(layer)
        self.layers_ready = layers
        return {"block_ids": self.sending}

    async def finish(self, timeout_s: float = 10.0) -> dict:
        try:
            for layer in range(self.layers_ready, self.transfer.num_layers):
                self.transfer.layer_ready(layer)
            stats = await self.transfer.finish(timeout_s)
        finally:
            ids = self._release()
        return {"block_ids": ids, "stats": stats.to_dict()}

    async def send(self, lease: dict, strategy: str = "contiguous", timeout_s: float = 10.0) -> dict:
        await self.start(lease, strategy)
        return await self.finish(timeout_s)

    def _release(self) -> list[int]:
        ids, self.sending, self.transfer = self.sending, [], None
        self.reserver.free(ids)
        return ids

    async def init_ranks(self, role: str, config: dict, layout: dict, heads: list[list[int]], seed: int = 0) -> dict:
        """A tensor-parallel side, as one mesh actor holds it: per rank a pool of the model-wide
        layout's KV heads heads[r] (a sender's cut from one random model-wide KV) and, on a
        receiver, a receiver over it. Block ids are the same on every rank: one reserver."""
        self.config = TransportConfig(**config)
        self.layout = KVLayout.from_wire(layout)
        self.reserver = ListReserver(self.layout.num_blocks)
        self.heads = [range(*h) for h in heads]
        self.rank_layouts = [dataclasses.replace(self.layout, kv_heads=len(h)) for h in self.heads]
        self.pools = [lay.allocate() for lay in self.rank_layouts]
        if role == "sender":
            whole = torch.randn(self.layout.shape, generator=torch.Generator().manual_seed(seed))
            for pool, h in zip(self.pools, self.heads):
                pool.copy_(whole[..., h.start:h.stop, :])
            self.sender = make_sender(self.config)
            return {}
        self.receivers = [make_receiver(self.config, pool, lay, self.reserver, first_head=h.start)
                          for pool, lay, h in zip(self.pools, self.rank_layouts, self.heads)]
        for rx in self.receivers:
            await rx.start()
        return {}

    async def reserve_parts(self, num_tokens: int, senders: list[list[list[int]]]) -> dict:
        """One reservation's leases, a part per receiving rank and head range that one rank of each
        sender (its ranks' heads) writes; its pools touched first (see warm)."""
        for pool in self.pools:
            pool.mul_(1)
        ids = self.reserver.allocate(self.layout.blocks_for(num_tokens))
        cut = parts(self.heads, [[range(*h) for h in sender] for sender in senders])
        leases = [(p.rank, self.receivers[p.rank].reserve(num_tokens, block_ids=ids, heads=p.heads)) for p in cut]
        return {"leases": [lease.to_wire() for _, lease in leases],
                "ranks": [rank for rank, _ in leases]}

    async def wait_parts(self, lease_ids: list[str], ranks: list[int], timeout_s: float) -> dict:
        """Every part's commit; the reservation's blocks go back once."""
        got = await asyncio.gather(*(self.receivers[r].wait(lease_id, timeout_s) for lease_id, r in zip(lease_ids, ranks)))
        self.reserver.free(got[0].block_ids)
        return {"stats": TransferStats.merged([g.stats for g in got]).to_dict()}

    async def send_parts(self, leases: list[dict], timeout_s: float = 10.0) -> dict:
        """Each part from the rank holding its heads, all side by side (as a mesh actor's ranks send);
        wall_s: from the first connect to the last commit."""
        descs = [LeaseDescriptor.from_wire(lease) for lease in leases]
        ranks = sending_ranks(self.heads, [(d.head_range.start, d.head_range.stop) for d in descs])
        for pool in self.pools:
            pool.mul_(1)
        ids = self.reserver.allocate(self.layout.blocks_for(descs[0].num_tokens))
        start = time.perf_counter()
        try:
            transfers = [await self.sender.start(d, self.pools[r], self.rank_layouts[r], ids, first_head=self.heads[r].start)
                         for d, r in zip(descs, ranks)]
            for transfer in transfers:
                transfer.all_layers_ready()
            stats = await asyncio.gather(*(t.finish(timeout_s) for t in transfers))
        finally:
            self.reserver.free(ids)
        return {"stats": TransferStats.merged(list(stats)).to_dict(), "wall_s": time.perf_counter() - start,
                "parts": len(descs), "sending_ranks": len(set(ranks))}

    async def read(self, block_ids: list[int], num_tokens: int) -> dict:
        kv = read_tokens(self.pool, self.layout, block_ids, num_tokens).float().cpu()
        return {"data": kv.numpy().tobytes(), "shape": list(kv.shape)}

    async def free(self, block_ids: list[int]) -> dict:
        self.reserver.free(block_ids)
        return {}

    async def warm(self) -> dict:
        """Touch the whole pool: this VM hands idle pages back to its host, and a
        page touched again costs about as much as a first touch (about 0.5 GB/s)."""
        self.pool.mul_(1)
        return {}

    async def status(self) -> dict:
        table = self.receiver.leases if hasattr(self, "receiver") else None
        while table is not None and table.draining:  # a stopped transfer's task is ending
            await asyncio.sleep(0.01)
        return {"free_blocks": len(self.reserver.free_ids), "leases": len(table or ())}

    async def advance(self, seconds: float) -> dict:
        self.now += seconds
        return {"expired": self.receiver.expire()}

    async def raw_listen(self, host: str, nbytes: int) -> dict:
        """A plain TCP socket for the benchmark's baseline (what the link gives without pdmesh),
        and a buffer for up to nbytes."""
        self.raw = socket.create_server((host, 0))
        self.raw_buf = np.ones(nbytes, np.uint8)
        self.raw_conn: socket.socket | None = None
        return {"port": self.raw.getsockname()[1]}

    async def raw_warm(self) -> dict:
        self.raw_buf.fill(1)  # touched again, as ``warm`` does the pool
        return {}

    async def raw_recv(self, nbytes: int) -> dict:
        """Reads nbytes, then answers one byte. One connection for every copy, as the
        backends keep theirs: a new one would pay TCP's slow start each time."""
        if self.raw_conn is None:
            self.raw_conn, _ = self.raw.accept()
        buf = memoryview(self.raw_buf[:nbytes])
        got = 0
        while got < nbytes:
            n = self.raw_conn.recv_into(buf[got:])
            if n == 0:
                raise EOFError(f"the sender left after {got} of {nbytes} bytes")
            got += n
        self.raw_conn.sendall(b"k")
        return {}

    async def raw_send(self, host: str, port: int, nbytes: int) -> dict:
        """GB/s from the first byte sent to the receiver's answer, as a KV transfer is timed."""
        if getattr(self, "raw_out", None) is None:
            self.raw_out = socket.create_connection((host, port))
        data = np.ones(nbytes, np.uint8)
        start = time.perf_counter()
        self.raw_out.sendall(memoryview(data))
        if self.raw_out.recv(1) != b"k":
            raise EOFError("the receiver left before answering")
        seconds = time.perf_counter() - start
        return {"gbps": nbytes / seconds / 1e9, "duration_s": seconds}

    async def die(self) -> None:
        os._exit(17)  # a peer that dies mid-transfer, without closing anything


async def _serve(stdin, stdout) -> None:
    loop = asyncio.get_running_loop()
    peer = _Peer()
    while True:
        try:
            # read in a thread: the event loop stays free for the transfers
            cmd = await loop.run_in_executor(None, _read, stdin)
        except EOFError:
            return
        name, args = cmd["cmd"], cmd.get("args", {})
        if name == "exit":
            return
        try:
            _write(stdout, {"ok": True, "result": await getattr(peer, name)(**args)})
        except TransferError as e:
            _write(stdout, {"ok": False, "code": e.code, "message": str(e)})
        except Exception as e:
            _write(stdout, {"ok": False, "code": type(e).__name__, "message": str(e)})


def main() -> None:
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    torch.set_num_threads(1)  # two peers share the machine's cores
    # The command pipe gets its own fd; fd 1 goes to stderr, so that anything
    # printed (UCX's C library logs to stdout) cannot corrupt it.
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    asyncio.run(_serve(stdin, stdout))
    # Skip interpreter teardown: closing UCX endpoints to a peer that died can spin forever.
    os._exit(0)


class PeerError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PeerProcess:
    """A peer process and the calls it answers (one at a time, or in order)."""

    def __init__(self, env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> None:
        """prefix: what runs the peer elsewhere, e.g. ip netns exec NAME."""
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "transport.peer"], cwd=root,
            env={**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n", **(env or {})},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def submit(self, cmd: str, **args) -> None:
        _write(self.proc.stdin, {"cmd": cmd, "args": args})

    def result(self):
        reply = _read(self.proc.stdout)
        if not reply["ok"]:
            raise PeerError(reply["code"], reply["message"])
        return reply["result"]

    def call(self, cmd: str, **args):
        self.submit(cmd, **args)
        return self.result()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.submit("exit")
                self.proc.wait(5)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    main()
