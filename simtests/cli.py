"""`pdmesh sim`: replay a trace (or a synthetic mix) on a simulated cluster, once or as the
four comparisons, and print tables (or JSON / Markdown) and, on request, PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

import click

CONFIGS = Path(__file__).with_name("configs")
DEFAULT_SCENARIOS = CONFIGS / "mooncake-4.yaml"


def _mix(value: str) -> tuple[str, float, int, int]:
    try:
        name, rate, prompt, output = value.split(":")
        return name, float(rate), int(prompt), int(output)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected SCENARIO:RATE:PROMPT:OUTPUT, e.g. chat:20:1000:300") from None


@click.command("sim")
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False),
              help="Mooncake JSONL, Azure CSV or BurstGPT CSV (detected from the file)")
@click.option("--time-scale", default=1.0, show_default=True, help="multiply arrival times (< 1: more load)")
@click.option("--repeat", default=1, show_default=True,
              help="overlay N copies of the trace, each shifted in time, with its own prefix ids")
@click.option("--limit", type=int, help="read only the first N rows of the trace")
@click.option("--mix", "mixes", multiple=True, help="synthetic load instead of a trace: "
              "SCENARIO:RATE:PROMPT:OUTPUT (requests/s, mean tokens); repeat for several scenarios")
@click.option("--shape", type=click.Choice(["poisson", "tidal", "bursty"]), default="poisson", show_default=True,
              help="synthetic arrivals: flat, day/night swings (scenarios out of phase), or bursts")
@click.option("--duration", default=3600.0, show_default=True, help="synthetic load: seconds")
@click.option("--period", default=600.0, show_default=True, help="synthetic load: seconds per tide or burst cycle")
@click.option("--seed", default=0, show_default=True)
@click.option("--scenarios", "scenarios_path", type=click.Path(exists=True, dir_okay=False),
              help=f"scenario specs (YAML); default: simtests/configs/{DEFAULT_SCENARIOS.name} (split by prompt "
                   "length), keeping only the scenarios the load has requests for")
@click.option("--profile", default="llama3-8b-h100", show_default=True,
              help="performance model: a built-in profile name or a profile file")
@click.option("--actors", type=int, help="scale the specs' initial counts to N actors in all")
@click.option("--compare", "comparisons",
              type=click.Choice(["pools", "placement", "transfer", "serving", "prefix", "autoscale", "all"]),
              multiple=True, help="run pdmesh against a baseline on the same load (repeatable; all: the four of "
              "P/D-Serve; autoscale: SLO attainment and actor-hours against the static fleet)")
@click.option("--converge", is_flag=True,
              help="time for the controller to bring a swapped split (each scenario's P and D counts "
                   "exchanged) within 10%% of the goodput from the file's split, window by window")
@click.option("--window", default=60.0, show_default=True, help="--converge: seconds per goodput window")
@click.option("--pools", type=click.Choice(["scenario", "mixed"]), default="scenario", show_default=True)
@click.option("--placement", type=click.Choice(["forward", "central"]), default="forward", show_default=True)
@click.option("--transfer", type=click.Choice(["contiguous", "block"]), default="contiguous", show_default=True)
@click.option("--serving", type=click.Choice(["disaggregated", "aggregated"]), default="disaggregated",
              show_default=True)
@click.option("--chunk-tokens", type=int,
              help="aggregated: prompt tokens per step beside the decode batch (chunked prefill; default 512)")
@click.option("--prefix", type=click.Choice(["off", "idle-first", "prefix-aware"]), default="off", show_default=True,
              help="prefix caches on prefill actors (traces with prefix ids: Mooncake's hash_ids)")
@click.option("--controller/--no-controller", default=True, show_default=True, help="the live ratio controller")
@click.option("--control-interval", default=10.0, show_default=True, help="seconds between controller steps")
@click.option("--report-interval", default=1.0, show_default=True, help="central scheduler: seconds between reports")
@click.option("--admission-timeout", default=5.0, show_default=True,
              help="seconds a request may wait for a prefill actor before RESOURCE_EXHAUSTED")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), help="write PNG plots to this folder")
@click.option("--output", type=click.Choice(["table", "json", "markdown"]), default="table", show_default=True)
def command(trace_path, time_scale, repeat, limit, mixes, shape, duration, period, seed, scenarios_path, profile,
            actors, comparisons, converge, window, pools, placement, transfer, serving, chunk_tokens, prefix,
            controller, control_interval, report_interval, admission_timeout, plot_dir, output) -> None:
    """Discrete-event simulation of a pdmesh cluster: the live admission, forwarding and
    ratio-controller code against modelled actors."""
    from rich.console import Console

    from scenarios.controller import Settings
    from scenarios.perf_model import ProfileError
    from scenarios.spec import SpecError
    from simtests import report
    from simtests.cluster import Variant, load_cluster
    from simtests.compare import compare
    from simtests.sim import Simulator
    from simtests.traces import TraceError, read_trace

    if bool(trace_path) == bool(mixes):
        raise click.UsageError("give either --trace FILE or --mix (synthetic load)")
    try:
        trace = read_trace(trace_path, time_scale, limit) if trace_path else None
        only = None if scenarios_path else _used(trace, mixes)
        cluster = load_cluster(scenarios_path or DEFAULT_SCENARIOS, profile, actors,
                               Settings(interval_s=control_interval), only)
        workload = _workload(cluster.specs, trace, trace_path, time_scale, repeat, mixes, shape, duration, period,
                             seed)
    except (SpecError, ProfileError, TraceError) as e:
        raise click.ClickException(str(e)) from None
    idle = _idle(cluster.specs, workload)
    if idle:
        click.echo(f"pdmesh sim: warning: scenario{'s' * (len(idle) > 1)} {', '.join(idle)} of "
                   f"{scenarios_path or DEFAULT_SCENARIOS.name} get no requests from the "
                   f"{'trace' if trace_path else '--mix load'}: their actors stay idle and their figures are "
                   f"empty; give --scenarios a file that fits the load", err=True)
    variant = Variant(pools=pools, placement=placement, transfer=transfer, serving=serving, prefix=prefix,
                      controller=controller, report_interval_s=report_interval, admission_timeout_s=admission_timeout,
                      **({"chunk_tokens": chunk_tokens} if chunk_tokens else {}))
    console = Console(stderr=output != "table")
    if not console.is_terminal:
        console.width = max(console.width, 160)  # piped to a file: keep table rows on one line
    model = next(iter(cluster.models.values()))
    title = (f"{workload.source} on {cluster.actors:,} actors in {len(cluster.specs)} scenarios, "
             f"model {model.name}")
    console.print(f"{title}\n(profile: {model.source})")
    if converge:
        _converge(cluster, workload, window, output)
        return
    four = ["pools", "placement", "transfer", "serving"]
    groups = {"all": four, "autoscale": ["autoscale", "actor-hours"]}
    names = list(dict.fromkeys(n for c in comparisons for n in groups.get(c, [c])))
    if names:
        outcomes = compare(names, cluster, workload, variant, lambda what: console.print(f"running {what} ..."))
        runs = {}
        for o in outcomes:
            runs[f"pdmesh ({o.comparison.name})" if o.comparison.ours else "pdmesh"] = o.pdmesh
            runs[o.comparison.baseline] = o.baseline
    else:
        outcomes, runs = [], {"pdmesh": Simulator(cluster, variant).run(workload)}
    if output == "json":
        click.echo(json.dumps({"title": title, "runs": {k: r.to_dict() for k, r in runs.items()},
                               "comparisons": [dict(zip(report.COMPARISON_HEAD, row))
                                               for row in report.comparison_rows(outcomes)],
                               "bounds": report.bounds(outcomes)}, indent=2))
    elif output == "markdown":
        click.echo(report.comparison_markdown(outcomes) if outcomes else report.run_line(runs["pdmesh"]))
    else:
        for label, run in runs.items():
            console.print(report.run_table(run, label))
            console.print(report.run_line(run))
        if outcomes:
            console.print(report.comparison_table(outcomes, title))
            for line in report.bounds(outcomes):
                console.print(line)
    if plot_dir:
        try:
            caption = f"{title}; profile {model.source}"
            for path in report.plot(runs, plot_dir, cluster.specs, workload, caption):
                console.print(f"wrote {path}")
        except RuntimeError as e:
            raise click.ClickException(str(e)) from None


def _converge(cluster, workload, window_s, output) -> None:
    from dataclasses import asdict

    from simtests.converge import converge

    c = converge(cluster, workload, window_s)
    if output == "json":
        click.echo(json.dumps(asdict(c), indent=2))
        return
    split = ", ".join(f"{name} {p}P:{d}D" for name, (p, d) in c.bad_split.items())
    when = f"after {c.converged_s:.0f} s" if c.converged_s is not None else "never, to the end of the load"
    click.echo(f"reference goodput {c.reference:.3f} req/s per actor (mean of {c.window_s:.0f} s windows); "
               f"from the swapped split ({split}) within {c.tolerance:.0%} {when} "
               f"({c.actions.get('flip', 0)} flips, {c.actions.get('lend', 0)} lends)")


def _used(trace, mixes) -> frozenset[str] | None:
    """The default file's scenarios that the load has requests for: those the trace's rows fall
    in by the file's match rules, or those --mix names (None when it names one the file lacks:
    the error then lists them all)."""
    import numpy as np

    from scenarios.spec import load_specs
    from simtests.workload import classify

    specs = load_specs(DEFAULT_SCENARIOS)
    if trace is not None:
        return frozenset(specs[i].name for i in np.unique(classify(trace, specs)))
    names = {name for name, *_ in map(_mix, mixes)}
    return frozenset(names) if names <= {s.name for s in specs} else None


def _idle(specs, workload) -> list[str]:
    """The scenarios the load has no request for."""
    import numpy as np

    counts = np.bincount(workload.scenario, minlength=len(specs))
    return [s.name for s, n in zip(specs, counts) if n == 0]


def _workload(specs, trace, trace_path, time_scale, repeat, mixes, shape, duration, period, seed):
    from simtests.traces import TraceError
    from simtests.traces import repeat as repeated
    from simtests.workload import Mix, classify, from_trace, synthetic

    if trace is not None:
        trace.scenario = classify(trace, specs)  # before repeating: each distinct row once
        return from_trace(repeated(trace, repeat), f"{trace.kind} trace {Path(trace_path).name}"
                          + (f" x{repeat}" if repeat > 1 else "") + (f", time x{time_scale:g}" if time_scale != 1 else ""))
    index = {s.name: i for i, s in enumerate(specs)}
    parsed = [_mix(m) for m in mixes]
    unknown = [name for name, *_ in parsed if name not in index]
    if unknown:
        raise TraceError(f"--mix names unknown scenarios {unknown}; known: {', '.join(index)}")
    return synthetic([Mix(index[name], rate, p, o) for name, rate, p, o in parsed], duration, shape, seed, period)
