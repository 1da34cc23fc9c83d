"""`pdmesh generate`: one prompt through the engine, printed as it streams."""
from __future__ import annotations

import sys
import time

import click

from mesh.engine.config import EngineConfig
from mesh.engine.errors import EngineError
from mesh.engine.random_checkpoint import default_model_dir
from mesh.engine.sampling_params import SamplingParams


def engine_options(f):
    """Options shared by every command that builds an engine."""
    for opt in reversed([
        click.option("--model", type=click.Path(file_okay=False), default=None,
                     help="Hugging Face checkpoint folder; default: a small random Llama pdmesh makes itself"),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "npu"]), default="auto",
                     show_default=True),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                     show_default=True, help="auto: the checkpoint's, or float32 on CPUs without bf16 units"),
        click.option("--kv-cache-gb", type=float, default=1.0, show_default=True),
    ]):
        f = opt(f)
    return f


def tensor_parallel_option(f):
    return click.option("--tensor-parallel-size", "-tp", type=click.IntRange(1, 64), default=1, show_default=True,
                        help="ranks to split the model across: this process and n-1 worker processes on this "
                             "host, each with 1/n of the weights and KV heads")(f)


def build_engine_config(model, device, dtype, kv_cache_gb, **extra) -> EngineConfig:
    return EngineConfig(model=str(model or default_model_dir()), device=device, dtype=dtype,
                        kv_cache_gb=kv_cache_gb, **extra)


@click.command("generate")
@click.argument("prompt")
@engine_options
@tensor_parallel_option
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--ignore-eos", is_flag=True, help="keep going past the end-of-sequence token")
def generate(prompt, model, device, dtype, kv_cache_gb, tensor_parallel_size, max_tokens, temperature, top_k, top_p,
             seed, stop, ignore_eos):
    """Print a completion of PROMPT as it streams."""
    from mesh.engine.engine import Engine  # torch loads only for commands that need it

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, stop=tuple(stop), ignore_eos=ignore_eos)
        engine = Engine(build_engine_config(model, device, dtype, kv_cache_gb,
                                            tensor_parallel_size=tensor_parallel_size))
        try:
            start, first, n = time.perf_counter(), None, 0
            for out in engine.stream(prompt, params):
                first = first or time.perf_counter()
                n += len(out.token_ids)
                sys.stdout.write(out.text)
                sys.stdout.flush()
                reason = out.finish_reason
        finally:
            engine.close()  # stops the worker ranks, if any
    except EngineError as e:
        raise click.ClickException(str(e)) from None
    end = time.perf_counter()
    tpot = (end - first) / max(n - 1, 1) * 1e3
    click.echo(f"\n[{n} tokens, finish: {reason}, TTFT {(first - start) * 1e3:.1f} ms, "
               f"TPOT {tpot:.1f} ms]", err=True)
