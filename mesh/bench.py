"""`pdmesh bench mesh`: one request set served by one actor doing both phases, then
disaggregated 1P:1D with the KV sent after the prefill and sent layer by layer as it is
computed (layer-wise), on an embedded local Ray, in one run.

The KV transfer's exposed time is the part of it that runs past the first token (not hidden
behind the prefill); time to the second token is when the decode side produced its first.
The first token streams from the prefill actor before any KV moves, so the transfer never
delays it: what layer-wise sending shortens is the gap from the first token to the second."""
from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from typing import TYPE_CHECKING

import click

from mesh.engine.cli import build_engine_config
from mesh.engine.config import EngineConfig

if TYPE_CHECKING:
    from transport import TransportConfig

progress = logging.getLogger("pdmesh.bench")  # phases, shown by `pdmesh bench` (gateway.progress)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def serve_set(pool, requests: list[list[int]], output_tokens: int, concurrency: int,
                    phase: str = "requests") -> dict:
    from mesh.api import SamplingParams
    from mesh.attempt import Request
    from mesh.dispatch import Dispatcher

    dispatcher = Dispatcher(pool)
    ttft, second, gap, tpot, transfer_s, transfer_gbps, exposed_s = [], [], [], [], [], [], []
    queue = list(enumerate(requests))
    produced = 0

    async def worker():
        nonlocal produced
        while queue:
            i, prompt = queue.pop(0)
            events, n = [], 0
            start = time.perf_counter()
            first = last = second_at = None
            async for chunk in dispatcher.generate(
                    Request(f"bench{i}", prompt, SamplingParams(max_tokens=output_tokens, temperature=0, ignore_eos=True)),
                    events):
                last = time.perf_counter()
                first = first or last
                n += len(chunk.token_ids)
                second_at = second_at or (last if n > 1 else None)
            produced += n
            progress.info(phase, extra={"done": len(ttft) + 1, "total": len(requests)})
            ttft.append(first - start)
            if second_at is not None:
                second.append(second_at - start)
                gap.append(second_at - first)
            if n > 1:
                tpot.append((last - first) / (n - 1))
            for e in events:
                if e.name == "kv_transfer":
                    transfer_s.append(e.attributes["duration_s"])
                    transfer_gbps.append(e.attributes["gbps"])
                    exposed_s.append(e.attributes["exposed_s"])

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await dispatcher.close()
    wall = time.perf_counter() - start
    return {
        "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "second_token_p50_ms": percentile(second, 50) * 1e3,
        "first_to_second_p50_ms": percentile(gap, 50) * 1e3,
        "tpot_p50_ms": percentile(tpot, 50) * 1e3, "tpot_p99_ms": percentile(tpot, 99) * 1e3,
        "output_tokens_per_s": produced / wall,
        "transfer_p50_ms": percentile(transfer_s, 50) * 1e3 if transfer_s else None,
        "transfer_gbps_p50": statistics.median(transfer_gbps) if transfer_gbps else None,
        "transfer_share_of_ttft": (statistics.median(transfer_s) / statistics.median(ttft)) if transfer_s else None,
        "exposed_transfer_p50_ms": percentile(exposed_s, 50) * 1e3 if exposed_s else None,
        "exposed_share_of_transfer": (sum(exposed_s) / sum(transfer_s)) if transfer_s else None,
    }


async def run(engine: EngineConfig, transport: TransportConfig, requests, output_tokens, concurrency) -> dict:
    from mesh.pool import Pool, PoolSpec

    results = {}
    for label, counts, threads, layerwise in (("aggregated 1 actor", {"both": 1}, 2, False),
                                              ("disaggregated 1P:1D", {"prefill": 1, "decode": 1}, 1, False),
                                              ("1P:1D layer-wise", {"prefill": 1, "decode": 1}, 1, True)):
        # the same cores in every set-up: one actor with two threads, or two with one each
        pool = Pool(PoolSpec("bench", engine.model_copy(update={"threads": threads}), transport, ttft_budget_s=60.0,
                             layerwise_kv=layerwise))
        try:
            progress.info(f"{label}: starting the actors")
            await pool.scale(**counts)
            results[label] = await serve_set(pool, requests, output_tokens, concurrency, f"{label}: requests")
        finally:
            await pool.close()
    return results


@click.command("mesh")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="checkpoint folder; default: the small random Llama")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--requests", "num_requests", type=int, default=16, show_default=True)
@click.option("--prompt-tokens", type=int, default=256, show_default=True)
@click.option("--output-tokens", type=int, default=32, show_default=True)
@click.option("--concurrency", type=int, default=4, show_default=True)
@click.option("--backend", type=click.Choice(["ucx", "tcp"]), default="ucx", show_default=True)
@click.option("--address", default=None, help="Ray cluster to join; default: an embedded local Ray")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def command(model, dtype, num_requests, prompt_tokens, output_tokens, concurrency, backend, address, output):
    """TTFT, TPOT and throughput: one actor doing both phases vs disaggregated 1P:1D."""
    import secrets

    import torch

    from mesh.cluster import connect, disconnect
    from transport import TransportConfig

    cfg = build_engine_config(model, "auto", dtype, 1.0)
    engine = EngineConfig(model=cfg.model, dtype=dtype, kv_cache_gb=0.5, max_num_seqs=64)
    transport = TransportConfig(backend=backend, secret=secrets.token_hex(16))
    g = torch.Generator().manual_seed(0)
    # lengths vary around prompt_tokens, so batches mix long and short prompts
    lengths = torch.randint(prompt_tokens // 2, prompt_tokens * 3 // 2 + 1, (num_requests,), generator=g).tolist()
    requests = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in lengths]
    connect(address)
    try:
        results = asyncio.run(run(engine, transport, requests, output_tokens, concurrency))
    finally:
        disconnect()
    summary = {"model": cfg.model, "requests": num_requests, "prompt_tokens_mean": sum(lengths) / len(lengths),
               "output_tokens": output_tokens, "concurrency": concurrency, "backend": backend, "results": results}
    if output == "json":
        click.echo(json.dumps(summary))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pdmesh bench mesh: {num_requests} requests, ~{prompt_tokens} in / {output_tokens} out, "
                        f"concurrency {concurrency}, KV over {backend}")
    table.add_column("figure")
    for label in results:
        table.add_column(label, justify="right")
    # the baseline of the same run for layer-wise sending: the KV sent after the prefill
    after, streamed = results["disaggregated 1P:1D"], results["1P:1D layer-wise"]
    table.add_column("layer-wise / after prefill", justify="right")
    for c in FIGURES:
        ratio = streamed[c] / after[c] if streamed[c] is not None and after[c] else None
        table.add_row(c.replace("_", " "), *(_figure(r[c]) for r in results.values()),
                      "-" if ratio is None else f"{ratio:.3g}x")
    Console().print(table)


FIGURES = ("ttft_p50_ms", "ttft_p99_ms", "second_token_p50_ms", "first_to_second_p50_ms", "tpot_p50_ms",
           "tpot_p99_ms", "output_tokens_per_s", "transfer_p50_ms", "transfer_gbps_p50", "transfer_share_of_ttft",
           "exposed_transfer_p50_ms", "exposed_share_of_transfer")


def _figure(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
