"""`pdmesh bench engine --tensor-parallel-size N`: the engine at TP=N against TP=1, side by side.

Both engines run the same checkpoint in one process (TP=N's other ranks in their own),
taking turns, each with its own thread count: TP=1 with the process's, each TP=N rank
with its share of the cores (what the engine gives it). Besides prefill and decode
speed it reports, per TP=N decode step, how many collectives rank 0 ran and how long it
spent in them (the transfer and the wait for the slowest rank), and each rank's weight
and KV bytes against TP=1's.
"""
from __future__ import annotations

import json
import statistics

import click
import torch

from mesh.engine.bench import DECODE_PROMPT, DECODE_STEPS, PREFILL_SHAPE, PdmeshRunner, decode_step_ms, \
    fresh_prompts, prefill_rates, prompts
from mesh.engine.config import EngineConfig
from mesh.engine.rank import RankMemory, rank_threads
from mesh.engine.sampling_params import SamplingParams


class ThreadedRunner(PdmeshRunner):
    """Runs an engine with its own torch thread count (engines sharing a process share the setting)."""

    def __init__(self, engine, threads: int):
        super().__init__(engine)
        self.threads = threads

    def run(self, batch: list[list[int]], new_tokens: int) -> list[float]:
        torch.set_num_threads(self.threads)
        return super().run(batch, new_tokens)


def collectives_per_decode_step(runner: ThreadedRunner, batch: list[list[int]]) -> tuple[float, float]:
    """(collectives, ms in them) per decode step of rank 0, medians over a run's decode steps."""
    engine, comm = runner.engine, runner.engine.ranks.comm
    torch.set_num_threads(runner.threads)
    for prompt in batch:
        engine.add_request(prompt, SamplingParams(max_tokens=1 + DECODE_STEPS, temperature=0, ignore_eos=True))
    engine.step()  # the prefill
    calls, ms = [], []
    while engine.has_unfinished():
        before = comm.calls, comm.seconds
        engine.step()
        calls.append(comm.calls - before[0])
        ms.append((comm.seconds - before[1]) * 1e3)
    return statistics.median(calls), statistics.median(ms)


def figures(config: EngineConfig, size: int, batch_sizes: tuple[int, ...], repeats: int) -> dict:
    from mesh.engine.engine import Engine

    one = Engine(config)
    cores = torch.get_num_threads()  # TP=1's, before the TP engine sets its rank's share
    tp = f"TP={size}"
    # The same blocks on every rank: each rank's KV is its heads' share of TP=1's.
    many = Engine(config.model_copy(update={"tensor_parallel_size": size, "num_blocks": one.kv.shape.num_blocks}))
    try:
        runners = {"TP=1": ThreadedRunner(one, cores),
                   tp: ThreadedRunner(many, rank_threads(many.config, many.device))}
        vocab = one.model_config.vocab_size
        result = {"model": config.model, "dtype": str(one.dtype).removeprefix("torch."), "size": size,
                  "threads": {name: r.threads for name, r in runners.items()},
                  "memory": {"TP=1": RankMemory.of(one.model, one.kv).__dict__,
                             tp: [m.__dict__ for m in many.ranks.memory]},
                  "prefill_tokens_per_s": prefill_rates(runners, fresh_prompts(*PREFILL_SHAPE, vocab), repeats),
                  "decode": {}}
        for b in batch_sizes:
            batch = prompts(b, DECODE_PROMPT, vocab, 2)
            step = decode_step_ms(runners, batch, repeats)
            calls, ms = collectives_per_decode_step(runners[tp], batch)
            result["decode"][b] = {"ms_per_step": step, "collectives_per_step": calls,
                                   "collective_ms_per_step": ms}
        return result
    finally:
        many.close()


def report(result: dict, output: str) -> None:
    if output == "json":
        click.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    tp = f"TP={result['size']}"
    table = Table(title=f"pdmesh bench engine, {tp} vs TP=1: {result['model']} ({result['dtype']}), "
                        f"threads {result['threads']}")
    for col in ("what", "TP=1", tp, f"{tp} speed / TP=1", f"rank 0's collectives per {tp} step"):
        table.add_column(col, justify="left" if col == "what" else "right")
    rates = result["prefill_tokens_per_s"]
    n, length = PREFILL_SHAPE
    table.add_row(f"prefill {n} x {length}", f"{rates['TP=1']:,.0f} tokens/s", f"{rates[tp]:,.0f} tokens/s",
                  f"{rates[tp] / rates['TP=1']:.2f}x", "-")
    for b, d in result["decode"].items():
        ms = d["ms_per_step"]
        table.add_row(f"decode batch {b}", f"{ms['TP=1']:.2f} ms/step", f"{ms[tp]:.2f} ms/step",
                      f"{ms['TP=1'] / ms[tp]:.2f}x",
                      f"{d['collectives_per_step']:.0f}, {d['collective_ms_per_step']:.2f} ms")
    console = Console()
    console.print(table)
    whole = result["memory"]["TP=1"]
    for rank, m in enumerate(result["memory"][tp]):
        console.print(f"rank {rank}: weights {m['weight_bytes'] / 1e6:,.1f} MB "
                      f"({m['weight_bytes'] / whole['weight_bytes']:.3f} of TP=1's {whole['weight_bytes'] / 1e6:,.1f}), "
                      f"KV {m['kv_bytes'] / 1e6:,.1f} MB ({m['kv_bytes'] / whole['kv_bytes']:.3f} of TP=1's)")
