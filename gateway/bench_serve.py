"""`pdmesh bench serve`: replays a trace or synthetic load against an OpenAI-compatible endpoint
and reports TTFT, TPOT, ITL and end-to-end latency, goodput under SLOs, rejections, failures
and tokens/s. Options that mean the same as `vllm bench serve`'s have its names.

With --vllm-python it also measures vLLM's OpenAI server on the same checkpoint, dtype and
load: vLLM first (started, measured, stopped), then pdmesh (started the same way, or the one
at --base-url), never both at once, and prints pdmesh over vLLM for each figure.
"""
from __future__ import annotations

import asyncio
import json
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

from gateway import bench_serve_load as load
from gateway import bench_serve_report as report
from gateway.bench_serve_workload import DATASETS, Shape

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Setup:
    """What the options resolve to: the served model and its checkpoint, and the SLOs."""
    model: str  # the name requests carry
    tokenizer: str  # a checkpoint folder with tokenizer.json
    checkpoint: str | None  # for servers this command starts
    dtype: str | None  # the config's engine.dtype, else --dtype
    config: str | None
    slo: report.Slo

    def server_dtype(self) -> str:
        """The dtype both started servers run: explicit, so that they run the same one."""
        if self.dtype not in (None, "auto"):
            return self.dtype
        if self.config:
            raise ValueError(f"{self.config}: set engine.dtype (float32, bfloat16, float16) so that both servers "
                             "run the same one")
        return "float32"


def resolve(model: str | None, served_model_name: str | None, tokenizer: str | None, config: str | None,
            scenario: str | None, dtype: str | None, slo_ttft: float | None, slo_tpot: float | None,
            goodput: tuple[str, ...]) -> Setup:
    """Raises ValueError (or scenarios.spec.SpecError) saying what to fix."""
    from gateway.config import load as load_config

    cfg = load_config(config) if config else None
    spec = _scenario(cfg, config, scenario) if cfg else None
    folder = model if model and Path(model).is_dir() else None
    checkpoint = spec.model if spec else folder
    if spec:
        name = cfg.served_name(spec)
    elif model:
        name = Path(model).name if folder else model
    else:
        raise ValueError("give --model (the served name, or the checkpoint folder) or --config")
    tok = tokenizer or checkpoint
    if not tok:
        raise ValueError(f"--model {model} is not a folder here: give --tokenizer, the checkpoint folder with the "
                         "served model's tokenizer.json (prompts are built from its vocabulary)")
    configured = cfg.engine.get("dtype") if cfg else None
    if cfg and dtype and dtype != configured:
        raise ValueError(f"--dtype {dtype}: pdmesh serve takes the dtype from {config}'s engine.dtype "
                         f"({configured or 'not set'}); set it there")
    return Setup(served_model_name or name, tok, checkpoint, configured if cfg else dtype, config,
                 _slo(spec, slo_ttft, slo_tpot, goodput))


def _scenario(cfg, path: str, name: str | None):
    specs = {s.name: s for s in cfg.scenarios}
    if name is None and len(specs) == 1:
        return next(iter(specs.values()))
    if name not in specs:
        raise ValueError(f"{path} has scenarios {', '.join(specs)}: name one with --scenario")
    return specs[name]


def _slo(spec, ttft_s: float | None, tpot_s: float | None, goodput: tuple[str, ...]) -> report.Slo:
    """--slo-ttft/--slo-tpot (s) and --goodput (ms, vLLM's form) over the scenario's SLO."""
    given = report.parse_goodput(goodput)
    for key, value in (("ttft", ttft_s), ("tpot", tpot_s)):
        if value is not None:
            if key in given and given[key] != value:
                raise ValueError(f"--slo-{key} {value:g} s and --goodput {key}:{given[key] * 1e3:g} differ; give one")
            given[key] = value
    base = {"ttft": spec.slo.ttft_s, "tpot": spec.slo.tpot_s} if spec else {}
    merged = {**base, **given}
    return report.Slo(merged.get("ttft"), merged.get("tpot"), merged.get("e2el"))


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: comma-separated numbers, e.g. 50,90,99", param_hint=flag) from None


def _measure(target: load.Target, planned, label: str, slo: report.Slo, pace: dict, metrics, percentiles):
    result = asyncio.run(load.run(target, planned, **pace))
    where = {"base_url": target.base_url, "endpoint": target.endpoint, "model": target.model}
    return result, report.summarize(result, slo, label, where, metrics, percentiles)


@click.command("serve")
@click.option("--base-url", default=None, help=f"the endpoint to load [default: {DEFAULT_BASE_URL}]; with "
              "--vllm-python, a running pdmesh to compare (else one is started)")
@click.option("--endpoint", type=click.Choice(load.ENDPOINTS), default="/v1/completions", show_default=True)
@click.option("--model", default=None, help="the served model's name, or its checkpoint folder (then the name "
              "is the folder's, as pdmesh serves it)")
@click.option("--served-model-name", default=None, help="the name requests carry, when it differs")
@click.option("--tokenizer", default=None, type=click.Path(file_okay=False, exists=True),
              help="checkpoint folder with the model's tokenizer.json [default: --model's or the scenario's]")
@click.option("--api-key", default=None, help="sent as a bearer token (and given to the servers this starts)")
@click.option("--config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="a pdmesh serve config: the model, dtype and default SLOs of its scenario")
@click.option("--scenario", default=None, help="which of the config's scenarios [default: its only one]")
@click.option("--dataset-name", type=click.Choice(DATASETS), default="random", show_default=True,
              help="random (synthetic) or a trace format, read from --dataset-path")
@click.option("--dataset-path", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--num-prompts", type=click.IntRange(min=1), default=None,
              help="requests [default: 1000 synthetic, or the whole trace]")
@click.option("--random-input-len", type=int, default=1024, show_default=True)
@click.option("--random-output-len", type=int, default=128, show_default=True)
@click.option("--random-range-ratio", type=float, default=0.0, show_default=True,
              help="lengths uniform within this share of the means")
@click.option("--request-rate", "--rate", type=float, default=None,
              help="requests/s, inf: all at once [default: inf; a trace keeps its own times]")
@click.option("--burstiness", type=float, default=1.0, show_default=True, help="gamma shape of the gaps (1: Poisson)")
@click.option("--max-concurrency", "--concurrency", type=click.IntRange(min=1), default=None,
              help="requests in flight at most [default: no cap]")
@click.option("--time-scale", type=float, default=1.0, show_default=True,
              help="a trace's times times this (below 1: more load)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--duration", type=float, default=None, help="send no request after this many seconds")
@click.option("--request-timeout", type=float, default=600.0, show_default=True,
              help="seconds one request may take; then it fails as 'timeout'")
@click.option("--num-warmups", type=click.IntRange(min=0), default=0, show_default=True,
              help="requests sent one by one first, not counted")
@click.option("--ignore-eos", is_flag=True, help="ask for every planned output token (random weights stop early)")
@click.option("--slo-ttft", type=float, default=None, help="TTFT target, s [default: the scenario's]")
@click.option("--slo-tpot", type=float, default=None, help="TPOT target, s [default: the scenario's]")
@click.option("--goodput", multiple=True, help="vLLM's form: KEY:MS pairs, KEY ttft, tpot or e2el")
@click.option("--percentile-metrics", default="ttft,tpot,itl,e2el", show_default=True)
@click.option("--metric-percentiles", default="50,90,99", show_default=True)
@click.option("--label", default=None, help="the run's name [default: the base URL]")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), default=None,
              help="write PNGs here: TTFT and TPOT CDFs (SLO marked), latency, goodput and load over time")
@click.option("--vllm-python", default=None, help="a Python with vLLM: measure its server first, then pdmesh's")
@click.option("--vllm-args", default="", help="more arguments for vLLM's server (one string)")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="for the servers this starts [default: the config's, else float32]")
@click.option("--ready-check-timeout-sec", type=float, default=600.0, show_default=True,
              help="how long a started server may take to answer")
@click.option("--server-log-dir", type=click.Path(file_okay=False), default=None,
              help="where started servers write their logs [default: a new temporary folder]")
def command(base_url, endpoint, model, served_model_name, tokenizer, api_key, config, scenario, dataset_name,
            dataset_path, num_prompts, random_input_len, random_output_len, random_range_ratio, request_rate,
            burstiness, max_concurrency, time_scale, seed, duration, request_timeout, num_warmups, ignore_eos,
            slo_ttft, slo_tpot, goodput, percentile_metrics, metric_percentiles, label, output, plot_dir,
            vllm_python, vllm_args, dtype, ready_check_timeout_sec, server_log_dir):
    """Load an OpenAI-compatible server (or vLLM's, then pdmesh's) and report latency, goodput and tokens/s."""
    from gateway.bench_serve_servers import ServerError
    from gateway.bench_serve_workload import WorkloadError, build
    from mesh import CheckpointError, Tokenizer
    from scenarios.spec import SpecError

    metrics = tuple(m.strip() for m in percentile_metrics.split(",") if m.strip())
    if not metrics or set(metrics) - set(report.METRICS):
        raise click.BadParameter(f"{percentile_metrics!r}: a comma-separated subset of {','.join(report.METRICS)}",
                                 param_hint="--percentile-metrics")
    percentiles = _floats(metric_percentiles, "--metric-percentiles")
    if request_timeout <= 0 or (duration is not None and duration <= 0):
        raise click.BadParameter("--request-timeout and --duration must be positive")
    try:
        setup = resolve(model, served_model_name, tokenizer, config, scenario, dtype, slo_ttft, slo_tpot, goodput)
        shape = Shape(dataset_name, dataset_path, num_prompts, random_input_len, random_output_len,
                      random_range_ratio, request_rate, burstiness, time_scale, seed,
                      chat=endpoint == "/v1/chat/completions")
        planned = build(shape, Tokenizer(setup.tokenizer))
        pace = {"max_concurrency": max_concurrency, "duration_s": duration, "num_warmups": num_warmups}

        def target(url: str) -> load.Target:
            return load.Target(url, setup.model, endpoint, api_key, request_timeout, ignore_eos)

        if vllm_python:
            logs = Path(server_log_dir or tempfile.mkdtemp(prefix="pdmesh-bench-serve-"))
            runs = _against_vllm(setup, vllm_python, tuple(shlex.split(vllm_args)), base_url, api_key, logs,
                                 ready_check_timeout_sec, target, planned, pace, metrics, percentiles)
        else:
            url = base_url or DEFAULT_BASE_URL
            runs = {label or url: _measure(target(url), planned, label or url, setup.slo, pace, metrics,
                                           percentiles)}
    except (ValueError, WorkloadError, SpecError, CheckpointError, ServerError) as e:
        raise click.ClickException(str(e)) from None
    reports = {name: summary for name, (_, summary) in runs.items()}
    title = _title(planned, dataset_name, setup.model, endpoint, request_rate, max_concurrency)
    if plot_dir:
        report.plot({name: result for name, (result, _) in runs.items()}, setup.slo, plot_dir, title)
    if output == "json":
        if len(reports) == 1:
            click.echo(json.dumps(next(iter(reports.values()))))
        else:
            click.echo(json.dumps({"runs": reports, "ratio": report.ratio(reports["pdmesh"], reports["vllm"])}))
        return
    report.print_table(reports, title)


def _title(planned, dataset_name: str, model: str, endpoint: str, rate: float | None, concurrency: int | None) -> str:
    pace = "the trace's times" if rate is None and dataset_name != "random" else f"{rate or float('inf'):g} requests/s"
    lengths = f", the first {len(planned[0].prompt_ids)} in / {planned[0].output_tokens} out" if planned else ""
    return (f"pdmesh bench serve: {len(planned)} {dataset_name} requests to {model} ({endpoint}) at {pace}, "
            f"concurrency {concurrency or 'uncapped'}{lengths}")


def _against_vllm(setup: Setup, python: str, extra: tuple[str, ...], base_url: str | None, api_key: str | None,
                  logs: Path, ready_timeout_s: float, target, planned, pace: dict, metrics, percentiles) -> dict:
    """vLLM's server, then pdmesh's (started, or the one at base_url), one after the other."""
    from gateway.bench_serve_servers import ServerUnderTest, pdmesh_command, vllm_command

    if not setup.checkpoint:
        raise ValueError("--vllm-python needs the checkpoint: give --model as its folder, or --config")
    dtype = setup.server_dtype()
    commands = [vllm_command(python, setup.checkpoint, dtype, setup.model, api_key, extra)]
    if not base_url:
        commands.append(pdmesh_command(setup.config, setup.checkpoint, dtype, api_key))
    runs = {}
    for command in commands:
        click.echo(f"bench serve: starting {command.label} ({shlex.join(command.argv)}); log {logs}", err=True)
        with ServerUnderTest(command, logs / f"{command.label}.log", api_key, ready_timeout_s):
            runs[command.label] = _measure(target(command.base_url), planned, command.label, setup.slo, pace,
                                           metrics, percentiles)
    if base_url:
        runs["pdmesh"] = _measure(target(base_url), planned, "pdmesh", setup.slo, pace, metrics, percentiles)
    return runs
