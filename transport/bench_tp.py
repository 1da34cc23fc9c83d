"""`pdmesh bench transport --tp 1:1,2:1,1:2,2:2,4:2`: the same request's KV moved between
tensor-parallel sides: prefill TP=a's ranks, each with its own pool of its KV heads, send to decode TP=b's ranks'
pools (one sending and one receiving process, as two mesh actors hold them; the lease cut
into parts by transport.heads, each part sent by the rank holding its heads, all side by
side). It prints MB/s, parts, runs and time per transfer against TP 1:1 in the same run.
"""
from __future__ import annotations

import json
import secrets
import statistics

import click
import torch

from .bench import BACKENDS, progress
from .layout import KVLayout
from .peer import PeerProcess


def split_heads(kv_heads: int, size: int) -> list[list[int]]:
    """Each rank's KV heads [start, stop) at `size` ranks, as the engine shards them when they split evenly."""
    per = kv_heads // size
    return [[r * per, (r + 1) * per] for r in range(size)]


class RanksPair:
    """Prefill TP=a into decode TP=b: each side one process holding its ranks' pools (transport.peer)."""

    def __init__(self, backend: str, env: dict[str, str], layout: KVLayout, sizes: tuple[int, int]) -> None:
        config = {"backend": backend, "secret": secrets.token_hex(16), "timeout_s": 60.0}
        self.senders = split_heads(layout.kv_heads, sizes[0])
        self.recv, self.send = PeerProcess(env), PeerProcess(env)
        self.recv.submit("init_ranks", role="receiver", config=config, layout=layout.to_wire(),
                         heads=split_heads(layout.kv_heads, sizes[1]))
        self.send.submit("init_ranks", role="sender", config=config, layout=layout.to_wire(), heads=self.senders,
                         seed=1)
        self.recv.result(), self.send.result()

    def transfer(self, tokens: int) -> dict:
        cut = self.recv.call("reserve_parts", num_tokens=tokens, senders=[self.senders])
        self.recv.submit("wait_parts", lease_ids=[lease["lease_id"] for lease in cut["leases"]], ranks=cut["ranks"],
                         timeout_s=120.0)
        sent = self.send.call("send_parts", leases=cut["leases"], timeout_s=120.0)
        self.recv.result()
        return sent

    def close(self) -> None:
        self.recv.close()
        self.send.close()


def run_tp(layout: KVLayout, sizes: list[int], degrees: list[tuple[int, int]], backend: str, rounds: int) -> dict:
    """Every TP pair moves each size once per round (interleaved, medians), TP 1:1 among them."""
    progress.info("starting the peers")
    name, env = BACKENDS[backend]
    pairs: dict[tuple[int, int], RanksPair] = {}
    walls: dict[tuple[int, tuple[int, int]], list[float]] = {}
    meta: dict[tuple[int, tuple[int, int]], dict] = {}
    try:
        for ab in degrees:
            pairs[ab] = RanksPair(name, env, layout, ab)
        for round_ in range(rounds + 1):  # round 0 warms up
            progress.info("warm-up round" if round_ == 0 else "measured rounds",
                          extra={"done": max(round_ - 1, 0), "total": 1 if round_ == 0 else rounds})
            for tokens in sizes:
                for ab, pair in pairs.items():
                    sent = pair.transfer(tokens)
                    if round_:
                        walls.setdefault((tokens, ab), []).append(sent["wall_s"])
                        meta[tokens, ab] = sent
    finally:
        for pair in pairs.values():
            pair.close()
    rows = []
    for (tokens, ab), values in walls.items():
        sent, wall = meta[tokens, ab], statistics.median(values)
        nbytes = sent["stats"]["bytes"]
        rows.append({"tokens": tokens, "tp": f"{ab[0]}:{ab[1]}", "mib": nbytes / 2**20, "ms": wall * 1e3,
                     "mbps": nbytes / wall / 1e6, "parts": sent["parts"], "sending_ranks": sent["sending_ranks"],
                     "runs": sent["stats"]["runs"], "ops": sent["stats"]["ops"], "strategy": sent["stats"]["strategy"],
                     "over_1_1": wall / statistics.median(walls[tokens, (1, 1)])})
    return {"rows": rows, "backend": backend}


def tensor_parallel(degrees, tokens, backends, layers, kv_heads, head_dim, block_size, dtype, rounds,
                     output) -> None:
    backends = backends or ["ucx"]
    if len(backends) != 1 or backends[0] == "local":
        raise click.BadParameter("--tp runs on one wire backend: ucx, ucx-tcp or tcp", param_hint="--backends")
    uneven = sorted({n for pair in degrees for n in pair if kv_heads % n})
    if uneven:
        raise click.BadParameter(f"{kv_heads} KV heads do not split evenly across {uneven} ranks", param_hint="--kv-heads")
    tokens = tokens or [512, 2048, 8192]
    layout = KVLayout(layers, -(-max(tokens) // block_size) + 8, block_size, kv_heads, head_dim, getattr(torch, dtype))
    result = run_tp(layout, tokens, degrees, backends[0], rounds)
    result.update(layout=layout.to_wire(), rounds=rounds)
    if output == "json":
        click.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    lay = result["layout"]
    table = Table(title=f"pdmesh bench transport --tp: {lay['num_layers']} layers x {lay['kv_heads']} KV heads "
                        f"x {lay['head_dim']}, {lay['dtype']}, blocks of {lay['block_size']}, {result['backend']}; "
                        f"prefill TP=a's ranks into decode TP=b's, median of {rounds} interleaved rounds")
    for col in ("tokens", "MiB", "a:b", "parts", "sending ranks", "strategy", "runs", "ms", "MB/s", "time / 1:1"):
        table.add_column(col, justify="right")
    for r in sorted(result["rows"], key=lambda r: (r["tokens"], r["tp"] != "1:1")):
        table.add_row(str(r["tokens"]), f"{r['mib']:.1f}", r["tp"], str(r["parts"]), str(r["sending_ranks"]),
                      r["strategy"], str(r["runs"]), f"{r['ms']:.2f}", f"{r['mbps']:,.0f}", f"{r['over_1_1']:.2f}x")
    Console().print(table)
