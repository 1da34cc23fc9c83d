"""`pdmesh bench transport`: GB/s for moving one request's KV, per backend and
strategy, beside a plain in-memory copy of the same bytes, in one run.

Rounds are interleaved (every size, backend and strategy once per round), so
that noise from a shared machine hits all of them alike; figures are medians.
Every pool and buffer is touched right before it is measured: this VM gives
idle pages back to its host (kdamond), and touching them again runs at about
0.5 GB/s, which measured 20x slower memcpy when buffers idled between rounds.

--across-namespaces puts the receiver and the sender on two hosts made of network
namespaces (transport/netns.py: veth links to a bridge, root needed) and measures UCX
over TCP and the tcp backend beside a plain socket copy of the same bytes over the same
link: what the network gives without pdmesh.

--tp 1:1,2:1,... measures head-sliced transfers between tensor-parallel degrees
(transport/bench_tp.py).

--path direct,staged measures both paths (transport/path.py) in one run, each on its own
pair of peers, and prints staged / direct. --device cuda puts the pools on the GPU and
sets them against a device-to-device copy on that GPU; without CUDA it says so and
measures nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import statistics
import time

import click
import numpy as np
import torch

from .address import ENV_HOST
from .config import TransportConfig
from .layout import KVLayout
from .netns import NamespaceNet, unavailable
from .peer import ListReserver, PeerProcess

progress = logging.getLogger("pdmesh.bench")  # phases, shown by `pdmesh bench` (gateway.progress)

# Backends as run here: UCX over shared memory, UCX forced onto TCP, the TCP
# backend, and the in-process copy.
BACKENDS = {"ucx": ("ucx", {}), "ucx-tcp": ("ucx", {"UCX_TLS": "tcp"}), "tcp": ("tcp", {}),
            "local": ("local", {})}
# Across namespaces only the network counts: UCX's shared memory would reach across them.
ACROSS = ("ucx-tcp", "tcp")
# From ../shared/BASELINES.md (same kind of machine, other runs): what this run is set against.
REFERENCE_GBPS = {"memcpy 64 MiB (numpy)": 20.6,
                  "ucxx shm 1 x 64 MiB": 8.4, "ucxx shm 4096 x 16 KiB concurrently": 0.6,
                  "asyncio TCP (uvloop), 64 MiB": 4.0}


class Places:
    """Where the two peers run: this host (loopback), or two namespace hosts."""

    def __init__(self, net: NamespaceNet | None = None) -> None:
        self.net = net

    def peers(self, backend: str, env: dict[str, str]) -> tuple[PeerProcess, PeerProcess]:
        if self.net is None:
            return PeerProcess(env), PeerProcess(env)
        recv, send = self.net.hosts["receiver"], self.net.hosts["sender"]
        # The receiver advertises its namespace's address; UCX uses each side's link.
        pin = (lambda host: {"UCX_NET_DEVICES": host.veth}) if backend == "ucx" else (lambda host: {})
        return (PeerProcess({**env, ENV_HOST: recv.address, **pin(recv)}, self.net.command(recv, [])),
                PeerProcess({**env, **pin(send)}, self.net.command(send, [])))

    @property
    def receiver_host(self) -> str:
        return self.net.hosts["receiver"].address if self.net else "127.0.0.1"


class PeerPair:
    """A receiver and a sender, each in its own process, both on one path."""

    def __init__(self, backend: str, env: dict[str, str], layout: KVLayout, fragmented: bool,
                 places: Places, path: str = "direct") -> None:
        config = {"backend": backend, "secret": secrets.token_hex(16), "timeout_s": 60.0, "path": path}
        self.recv, self.send = places.peers(backend, env)
        self.recv.submit("init", role="receiver", config=config, layout=layout.to_wire())
        self.send.submit("init", role="sender", config=config, layout=layout.to_wire(), seed=1)
        self.recv.result(), self.send.result()
        if fragmented:
            self.recv.call("order", seed=2)
            self.send.call("order", seed=3)

    def transfer(self, tokens: int, strategy: str) -> dict:
        self.recv.call("warm")
        self.send.call("warm")
        lease = self.recv.call("reserve", num_tokens=tokens, ttl_s=120.0)
        self.recv.submit("wait", lease_id=lease["lease_id"], timeout_s=120.0)
        sent = self.send.call("send", lease=lease, strategy=strategy, timeout_s=120.0)
        self.recv.call("free", block_ids=self.recv.result()["block_ids"])
        return sent["stats"]

    def close(self) -> None:
        self.recv.close()
        self.send.close()


class SocketPair:
    """A plain TCP socket copy between the same two places: the link's own speed."""

    def __init__(self, layout: KVLayout, places: Places, max_tokens: int) -> None:
        self.layout = layout
        self.recv, self.send = places.peers("socket", {})
        self.host = places.receiver_host
        self.port = self.recv.call("raw_listen", host=self.host, nbytes=self._bytes(max_tokens))["port"]

    def _bytes(self, tokens: int) -> int:
        return tokens * self.layout.num_layers * 2 * self.layout.token_bytes

    def transfer(self, tokens: int, strategy: str) -> dict:
        nbytes = self._bytes(tokens)
        self.recv.call("raw_warm")
        self.recv.submit("raw_recv", nbytes=nbytes)
        sent = self.send.call("raw_send", host=self.host, port=self.port, nbytes=nbytes)
        self.recv.result()
        return {**sent, "strategy": None}

    def close(self) -> None:
        self.recv.close()
        self.send.close()


class LocalPair:
    """The in-process backend, on this process's event loop."""

    def __init__(self, layout: KVLayout, fragmented: bool) -> None:
        from .backends import make_receiver, make_sender

        self.layout = layout
        self.loop = asyncio.new_event_loop()
        self.src_res, self.dst_res = ListReserver(layout.num_blocks), ListReserver(layout.num_blocks)
        if fragmented:
            self.dst_res.order(2)
            self.src_res.order(3)
        self.src = layout.allocate()
        self.src.copy_(torch.randn(layout.shape, generator=torch.Generator().manual_seed(1)))
        config = TransportConfig(backend="local")
        self.sender = make_sender(config)
        self.receiver = make_receiver(config, layout.allocate(), layout, self.dst_res)

    def transfer(self, tokens: int, strategy: str) -> dict:
        async def run() -> dict:
            self.src.mul_(1)  # touched again: see the module's note
            self.receiver.pool.mul_(1)
            lease = self.receiver.reserve(tokens, 120.0)
            ids = self.src_res.allocate(self.layout.blocks_for(tokens))
            stats = await self.sender.send(lease, self.src, self.layout, ids, strategy)
            self.src_res.free(ids)
            self.dst_res.free((await self.receiver.wait(lease.lease_id)).block_ids)
            return stats.to_dict()
        return self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.close()


def memcpy_gbps(src: np.ndarray, dst: np.ndarray) -> float:
    np.copyto(dst, src)  # touched again: see the module's note
    start = time.perf_counter()
    np.copyto(dst, src)
    return src.nbytes / (time.perf_counter() - start) / 1e9


def device_copy_gbps(src: torch.Tensor, dst: torch.Tensor) -> float:
    """A device-to-device copy on one GPU: what the GPU's own memory gives."""
    dst.copy_(src)
    torch.cuda.synchronize(src.device)
    start = time.perf_counter()
    dst.copy_(src)
    torch.cuda.synchronize(src.device)
    return src.numel() * src.element_size() / (time.perf_counter() - start) / 1e9


def cuda_missing() -> str | None:
    """None when the pools can go on a CUDA GPU here, else why not."""
    if not torch.cuda.is_available():
        return f"no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return None


def _pairs(layout: KVLayout, backends: list[str], paths: list[str], fragmented: bool,
           places: Places) -> dict[tuple[str, str], object]:
    """One pair per backend and path; the local backend has no wire, so no staged path."""
    pairs: dict[tuple[str, str], object] = {}
    for name in backends:
        backend, env = BACKENDS[name]
        for path in paths:
            if backend == "local":
                if path == "direct":
                    pairs[name, path] = LocalPair(layout, fragmented)
            else:
                pairs[name, path] = PeerPair(backend, env, layout, fragmented, places, path)
    return pairs


def run(layout: KVLayout, sizes: list[int], backends: list[str], strategies: list[str],
        rounds: int, fragmented: bool, places: Places | None = None,
        paths: list[str] = ("direct",)) -> dict:
    places = places or Places()
    progress.info("starting the peers")
    pairs = _pairs(layout, backends, list(paths), fragmented, places)
    if places.net is not None:
        pairs["socket", "-"] = SocketPair(layout, places, max(sizes))
    biggest = max(sizes) * layout.num_layers * 2 * layout.token_bytes
    on_gpu = torch.device(layout.device).type == "cuda"
    if on_gpu:
        src = torch.ones(biggest, dtype=torch.uint8, device=layout.device)
        dst = torch.ones_like(src)
    else:
        src, dst = np.ones(biggest, np.uint8), np.ones(biggest, np.uint8)
    gbps: dict[tuple[int, str, str, str], list[float]] = {}
    meta: dict[tuple[int, str, str, str], dict] = {}
    try:
        for round_ in range(rounds + 1):  # round 0 warms up: connections, endpoints, buffers
            progress.info("warm-up round" if round_ == 0 else "measured rounds",
                          extra={"done": max(round_ - 1, 0), "total": 1 if round_ == 0 else rounds})
            for tokens in sizes:
                n = tokens * layout.num_layers * 2 * layout.token_bytes
                copied = (device_copy_gbps if on_gpu else memcpy_gbps)(src[:n], dst[:n])
                if round_:
                    gbps.setdefault((tokens, "memcpy", "", ""), []).append(copied)
                for (name, path), pair in pairs.items():
                    for strategy in strategies if name != "socket" else ["-"]:
                        stats = pair.transfer(tokens, strategy)
                        if round_:
                            gbps.setdefault((tokens, name, strategy, path), []).append(stats["gbps"])
                            meta[tokens, name, strategy, path] = stats
        progress.info("measured rounds", extra={"done": rounds, "total": rounds})
    finally:
        for pair in pairs.values():
            pair.close()
    rows = []
    for (tokens, name, strategy, path), values in gbps.items():
        stats = meta.get((tokens, name, strategy, path), {})
        rows.append({"tokens": tokens, "backend": name, "strategy": strategy or "-", "path": path or "-",
                     "mib": tokens * layout.num_layers * 2 * layout.token_bytes / 2**20,
                     "gbps": statistics.median(values), "ops": stats.get("ops"),
                     "runs": stats.get("runs"), "used": stats.get("strategy"),
                     "used_path": stats.get("path")})
    return {"rows": rows, "ratios": ratios(rows)}


def ratios(rows: list[dict]) -> list[dict]:
    """Per size, backend and path: contiguous vs blocks, vs the in-memory (or on-GPU) copy
    and (across namespaces) vs the plain socket copy over the same link; and staged vs
    direct, contiguous, where both paths ran."""
    by = {(r["tokens"], r["backend"], r["strategy"], r["path"]): r["gbps"] for r in rows}
    out = []
    for (tokens, backend, strategy, path), value in by.items():
        if strategy != "contiguous":
            continue
        blocks = by.get((tokens, backend, "blocks", path))
        sock = by.get((tokens, "socket", "-", "-"))
        direct = by.get((tokens, backend, "contiguous", "direct"))
        out.append({"tokens": tokens, "backend": backend, "path": path,
                    "contiguous_over_blocks": value / blocks if blocks else None,
                    "contiguous_over_memcpy": value / by[tokens, "memcpy", "-", "-"],
                    "contiguous_over_socket": value / sock if sock else None,
                    "staged_over_direct": value / direct if path == "staged" and direct else None})
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _degrees(ctx, param, text: str | None) -> list[tuple[int, int]] | None:
    """a:b pairs, TP 1:1 first (the baseline) whether named or not."""
    if not text:
        return None
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: write prefill:decode degrees, e.g. 1:1,2:1,1:2") from None
    bad = [":".join(map(str, p)) for p in pairs if len(p) != 2 or not set(p) <= {1, 2, 4}]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)}: each pair is prefill:decode, each degree 1, 2 or 4")
    return [(1, 1)] + [p for p in dict.fromkeys(pairs) if p != (1, 1)]


def _names(allowed):
    def parse(ctx, param, text: str) -> list[str]:
        names = text.split(",")
        bad = [n for n in names if n not in allowed]
        if bad:
            raise click.BadParameter(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        return names
    return parse


@click.command("transport")
@click.option("--tokens", default=None, callback=lambda c, p, v: v and _ints(v),
              help="request sizes in tokens  [default: 512,2048,8192; across namespaces 2048,8192]")
@click.option("--backends", default=None, callback=lambda c, p, v: v and _names(list(BACKENDS))(c, p, v),
              help=f"of {', '.join(BACKENDS)}  [default: all; across namespaces {','.join(ACROSS)}]")
@click.option("--strategies", default="contiguous,blocks", show_default=True,
              callback=_names(["contiguous", "blocks", "gather"]))
@click.option("--layers", type=int, default=16, show_default=True)
@click.option("--kv-heads", type=int, default=8, show_default=True)
@click.option("--head-dim", type=int, default=64, show_default=True)
@click.option("--block-size", type=int, default=16, show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True)
@click.option("--rounds", type=int, default=5, show_default=True)
@click.option("--fragmented", is_flag=True, help="shuffle both pools' free lists")
@click.option("--across-namespaces", is_flag=True,
              help="receiver and sender on two network namespaces joined by veth (root), beside a plain "
                   "socket copy over the same link")
@click.option("--path", "paths", default="direct", show_default=True,
              callback=_names(["direct", "staged"]),
              help="direct (the data plane moves the pools' own memory), staged (through host buffers "
                   "on copy streams) or both, each on its own peers, with staged / direct")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="where the pools are; cuda is set against a device-to-device copy on the GPU")
@click.option("--tp", "degrees", default=None, callback=_degrees,
              help="prefill:decode tensor-parallel degrees (1, 2 or 4), e.g. 1:1,2:1,1:2,2:2,4:2: the same KV "
                   "between the ranks' pools, against 1:1 in the same run (one wire backend, default ucx)")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def command(tokens, backends, strategies, layers, kv_heads, head_dim, block_size, dtype, rounds,
            fragmented, across_namespaces, paths, device, degrees, output):
    """GB/s moving one request's KV (default: a 1B-class model, Llama-3.2-1B's KV shape, bf16)."""
    if degrees:
        if device != "cpu" or across_namespaces or fragmented or paths != ["direct"]:
            raise click.UsageError("--tp moves CPU pools on this host, direct, unfragmented: leave out --device, "
                                   "--across-namespaces, --fragmented and --path")
        from .bench_tp import tensor_parallel  # it imports this module's backends

        tensor_parallel(degrees, tokens, backends, layers, kv_heads, head_dim, block_size, dtype, rounds, output)
        return
    if device == "cuda" and cuda_missing():
        reason = f"bench transport --device cuda skipped: {cuda_missing()}; nothing was measured"
        click.echo(json.dumps({"skipped": reason}) if output == "json" else reason)
        return
    if across_namespaces:
        tokens, backends = tokens or [2048, 8192], backends or list(ACROSS)
        wrong = [b for b in backends if b not in ACROSS]
        if wrong:
            raise click.BadParameter(f"{', '.join(wrong)} cannot cross namespaces (shared memory reaches across "
                                     f"them); choose from {', '.join(ACROSS)}", param_hint="--backends")
        reason = unavailable()
        if reason:
            raise click.UsageError(f"--across-namespaces: {reason}")
    # On the GPU: UCX as it is (cuda_ipc between the two processes) and the in-process copy.
    tokens, backends = tokens or [512, 2048, 8192], backends or (
        ["ucx", "local"] if device == "cuda" else list(BACKENDS))
    # One thread, as in each peer process: OpenMP workers that wait on cores busy
    # with the peers made the in-process copies 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    num_blocks = -(-max(tokens) // block_size) + 8
    layout = KVLayout(layers, num_blocks, block_size, kv_heads, head_dim, getattr(torch, dtype),
                      "cuda:0" if device == "cuda" else "cpu")
    net = NamespaceNet(["receiver", "sender"], tag="pdmb").start() if across_namespaces else None
    try:
        result = run(layout, tokens, backends, strategies, rounds, fragmented, Places(net), paths)
    finally:
        torch.set_num_threads(threads)
        if net is not None:
            net.close()
    result.update(layout=layout.to_wire(), rounds=rounds, fragmented=fragmented, device=device,
                  across_namespaces=across_namespaces, reference_gbps=REFERENCE_GBPS)
    if output == "json":
        click.echo(json.dumps(result))
        return
    _print(result)


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    lay = result["layout"]
    console = Console()
    table = Table(title=f"pdmesh bench transport: {lay['num_layers']} layers x {lay['kv_heads']} KV heads "
                        f"x {lay['head_dim']}, {lay['dtype']}, blocks of {lay['block_size']}"
                        f"{', fragmented pools' if result['fragmented'] else ''}"
                        f"{', across two network namespaces (veth)' if result['across_namespaces'] else ''}"
                        f"{', pools on the GPU (memcpy: a device-to-device copy)' if result['device'] == 'cuda' else ''}; "
                        f"median of {result['rounds']} interleaved rounds")
    for col in ("tokens", "MiB", "backend", "strategy", "used", "path", "runs", "ops", "GB/s"):
        table.add_column(col, justify="right")
    for r in sorted(result["rows"], key=lambda r: (r["tokens"], r["backend"] != "memcpy", r["path"])):
        table.add_row(str(r["tokens"]), f"{r['mib']:.0f}", r["backend"], r["strategy"],
                      r["used"] or "-", r["used_path"] or "-", str(r["runs"] or "-"),
                      str(r["ops"] or "-"), f"{r['gbps']:.2f}")
    console.print(table)
    ratios = Table(title="ratios within this run")
    across = result["across_namespaces"]
    both = any(r["staged_over_direct"] is not None for r in result["ratios"])
    for col in ("tokens", "backend", "path", "contiguous / blocks", "contiguous / memcpy",
                *(["contiguous / socket"] if across else []), *(["staged / direct"] if both else [])):
        ratios.add_column(col, justify="right")
    for r in sorted(result["ratios"], key=lambda r: (r["tokens"], r["backend"], r["path"])):
        cb, sd = r["contiguous_over_blocks"], r["staged_over_direct"]
        ratios.add_row(str(r["tokens"]), r["backend"], r["path"], "-" if cb is None else f"{cb:.1f}x",
                       f"{r['contiguous_over_memcpy']:.0%}",
                       *([f"{r['contiguous_over_socket']:.0%}"] if across else []),
                       *([("-" if sd is None else f"{sd:.0%}")] if both else []))
    console.print(ratios)
    if result["device"] == "cuda":
        return  # BASELINES.md holds host figures only
    by = {(r["tokens"], r["backend"], r["strategy"]): r["gbps"] for r in result["rows"]
          if r["path"] in ("direct", "-")}
    refs = Table(title="against ../shared/BASELINES.md (other runs: figures moved up to 2x)")
    for col in ("this run", "GB/s", "reference", "GB/s", "ratio"):
        refs.add_column(col, justify="right")
    big = max(r["tokens"] for r in result["rows"])
    for mine, ref in (((big, "memcpy", "-"), "memcpy 64 MiB (numpy)"),
                      ((big, "ucx", "contiguous"), "ucxx shm 1 x 64 MiB"),
                      ((big, "ucx", "blocks"), "ucxx shm 4096 x 16 KiB concurrently"),
                      ((big, "tcp", "contiguous"), "asyncio TCP (uvloop), 64 MiB")):
        if mine in by:
            refs.add_row(f"{mine[0]} tokens {mine[1]} {mine[2]}".replace(" -", ""), f"{by[mine]:.2f}",
                         ref, f"{REFERENCE_GBPS[ref]:.2f}", f"{by[mine] / REFERENCE_GBPS[ref]:.2f}")
    console.print(refs)
