"""`pdmesh sim`: replay a trace on a simulated cluster."""
from __future__ import annotations

import click


@click.command("sim")
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Mooncake JSONL, Azure CSV or BurstGPT CSV (detected from the file)")
@click.option("--time-scale", default=1.0, show_default=True, help="multiply arrival times (< 1: more load)")
@click.option("--repeat", default=1, show_default=True, help="overlay N copies of the trace, shifted in time")
def command(trace_path: str, time_scale: float, repeat: int) -> None:
    """Discrete-event simulation of a pdmesh cluster on a request trace."""
    from simtests.traces import TraceError, read_trace, repeat as repeated

    try:
        trace = repeated(read_trace(trace_path, time_scale), repeat)
    except TraceError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{trace.kind} trace: {len(trace)} requests over {trace.duration_s:.0f} s, "
               f"mean prompt {trace.prompt.mean():.0f}, mean output {trace.output.mean():.0f} tokens")
