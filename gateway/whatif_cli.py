"""`pdmesh what-if --trace FILE --ratio P:D`: predicted SLO attainment and throughput of a
split for a request trace (BurstGPT CSV, Azure CSV or Mooncake JSONL), from the performance
model (scenarios.whatif), before an operator applies it. Runs offline: no gateway needed."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click

from gateway.ops import parse_ratio

EXIT_BAD_INPUT = 2


def _fail(output: str, message: str) -> None:
    if output == "json":
        click.echo(json.dumps({"error": {"message": message, "exit_code": EXIT_BAD_INPUT}}))
    click.echo(f"pdmesh: error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


@click.command("what-if")
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False),
              help="BurstGPT CSV, Azure LLM inference CSV or Mooncake JSONL")
@click.option("--ratio", "ratios", required=True, multiple=True, metavar="P:D",
              callback=lambda ctx, param, vs: [parse_ratio(v) for v in vs],
              help="prefill:decode actor counts; repeat to compare splits")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="scenarios YAML (or pdmesh serve's config): the SLO and limits of --scenario")
@click.option("--scenario", default=None, help="which scenario of --config (default: the only one)")
@click.option("--ttft-s", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="TTFT target without --config")
@click.option("--tpot-s", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="TPOT target without --config")
@click.option("--percentile", type=click.FloatRange(min=0, max=100, min_open=True), default=90.0,
              show_default=True, help="share of requests that must meet both, without --config")
@click.option("--profile", default="small-llama-cpu", show_default=True,
              help="performance model: a built-in profile name or a profile file")
@click.option("--time-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="below 1 compresses the trace's time (more load)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="read only the first N requests")
@click.option("--window-s", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="the load is taken as steady within each window")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def what_if(trace_path, ratios, config_path, scenario, ttft_s, tpot_s, percentile, profile, time_scale, limit,
            window_s, output):
    """Predict SLO attainment and throughput of P:D splits for a trace, with the performance model."""
    from gateway.config import load_model
    from scenarios.perf_model import ProfileError
    from scenarios.spec import SLO, ScenarioSpec, SpecError, load_specs
    from scenarios.whatif import predict, suggest
    from simtests.traces import TraceError, read_trace

    try:
        if config_path:
            specs = {s.name: s for s in load_specs(config_path)}
            if scenario is None and len(specs) > 1:
                raise SpecError(f"{config_path} has several scenarios: pick one with --scenario "
                                f"({', '.join(specs)})")
            if scenario is not None and scenario not in specs:
                raise SpecError(f"unknown scenario {scenario!r}; {config_path} has: {', '.join(specs)}")
            spec = specs[scenario or next(iter(specs))]
        else:
            spec = ScenarioSpec(name=scenario or "what-if", model="-", slo=SLO(ttft_s=ttft_s, tpot_s=tpot_s,
                                                                                percentile=percentile))
        for p, d in ratios:
            for role, n in (("prefill", p), ("decode", d)):
                lim = spec.limits[role]
                if not max(lim.min, 1) <= n <= lim.max:
                    raise SpecError(f"ratio {p}:{d}: {role} {n} is outside scenario {spec.name!r}'s limits "
                                    f"[{max(lim.min, 1)}, {lim.max}]")
        model = load_model(profile)
        trace = read_trace(trace_path, time_scale, limit)
    except (SpecError, ProfileError, TraceError) as e:
        _fail(output, str(e))
    results = [predict(trace.arrival_s, trace.prompt, trace.output, spec, model, p, d, window_s) for p, d in ratios]
    rate = len(trace) / max(trace.duration_s, window_s)
    hint = {n: suggest(trace.prompt, trace.output, rate, spec, model, n) for n in sorted({p + d for p, d in ratios})}
    data = {"trace": {"path": trace_path, "kind": trace.kind, "requests": len(trace), "duration_s": trace.duration_s,
                      "mean_prompt": float(trace.prompt.mean()), "mean_output": float(trace.output.mean())},
            "scenario": spec.name, "slo": spec.slo.model_dump(), "profile": model.name,
            "predictions": [asdict(r) for r in results],
            "controller_split": {str(n): asdict(s) for n, s in hint.items()}}
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    else:
        _render(data)


def _render(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t, slo = data["trace"], data["slo"]
    console = Console()
    console.print(f"{t['kind']} trace {t['path']}: {t['requests']} requests over {t['duration_s']:.0f} s, "
                  f"prompt {t['mean_prompt']:.0f} / output {t['mean_output']:.0f} tokens on average; "
                  f"SLO TTFT <= {slo['ttft_s']:g} s, TPOT <= {slo['tpot_s']:g} s for {slo['percentile']:g}%; "
                  f"model {data['profile']}")
    table = Table(title="what-if")
    for col in ("P:D", "SLO met", "TTFT met", "TPOT met", "served req/s", "output tok/s", "prefill util p50/max",
                "decode util p50/max", "overloaded"):
        table.add_column(col, justify="left" if col == "P:D" else "right")
    for r in data["predictions"]:
        met = f"{100 * r['slo_attainment']:.1f}%"
        table.add_row(f"{r['prefill']}:{r['decode']}",
                      met if r["slo_attainment"] >= r["goal"] else f"[red]{met}[/red]",
                      f"{100 * r['ttft_attainment']:.1f}%", f"{100 * r['tpot_attainment']:.1f}%",
                      f"{r['served_rps']:.2f}", f"{r['output_tokens_per_s']:.0f}",
                      f"{r['prefill_utilisation_p50']:.2f}/{r['prefill_utilisation_max']:.2f}",
                      f"{r['decode_utilisation_p50']:.2f}/{r['decode_utilisation_max']:.2f}",
                      f"{100 * r['overloaded_share']:.0f}%")
    console.print(table)
    for n, s in data["controller_split"].items():
        console.print(f"for the trace's mean load, the controller would split {n} actors {s['prefill']}:{s['decode']} "
                      f"(the load needs {s['prefill_needed']:.2f}P:{s['decode_needed']:.2f}D)")
