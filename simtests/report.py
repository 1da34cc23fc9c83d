"""Simulation results as terminal tables (rich), Markdown (for the README) and PNG plots."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from simtests.compare import Outcome
from simtests.results import Run

STAT_COLUMNS = (("requests", "requests", "{:d}"), ("rejected", "rejected", "{:d}"),
                ("TTFT p50 s", "ttft_p50_s", "{:.2f}"), ("TTFT p99 s", "ttft_p99_s", "{:.2f}"),
                ("TPOT p50 ms", "tpot_p50_s", "{:.0f}", 1e3), ("TPOT p99 ms", "tpot_p99_s", "{:.0f}", 1e3),
                ("TTFT ok", "ttft_attainment", "{:.1%}"), ("TPOT ok", "tpot_attainment", "{:.1%}"),
                ("SLO ok", "slo_attainment", "{:.1%}"), ("goodput /s/actor", "goodput", "{:.3f}"),
                ("KV transfer ms", "transfer_mean_s", "{:.0f}", 1e3), ("prefix hits", "prefix_hit_rate", "{:.0%}"))


def run_table(run: Run, title: str) -> Table:
    table = Table(title=title)
    table.add_column("scenario")
    for head, *_ in STAT_COLUMNS:
        table.add_column(head, justify="right")
    for s in run.stats():
        table.add_row(s.scenario, *(_cell(s, col) for col in STAT_COLUMNS))
    return table


def _cell(stats: object, col: tuple) -> str:
    value = getattr(stats, col[1])
    if value != value:  # nan: no request of this scenario was served
        return "-"
    return col[2].format(value * col[3] if len(col) > 3 else value)


def run_line(run: Run) -> str:
    util = ", ".join(f"{k} {v:.0%}" for k, v in run.utilisation.items())
    line = (f"{len(run.state):,} requests on {run.actors:,} actors: {run.events:,} events in {run.wall_s:.1f} s "
            f"wall ({run.events_per_s:,.0f} events/s; {run.cpu_s:.1f} s of CPU), {run.end_s:,.0f} s simulated; "
            f"busy: {util}")
    if not run.timeline:
        return line
    first, last = {}, {}
    for _, pool, p, d in run.timeline:
        first.setdefault(pool, (p, d))
        last[pool] = (p, d)
    ratios = ", ".join(f"{name} {first[k][0]}:{first[k][1]} -> {last[k][0]}:{last[k][1]}"
                       for k, name in enumerate(run.names))
    refused = f", {run.actions['refused']} refused by the role rule" if run.actions.get("refused") else ""
    return f"{line}; controller: {run.actions['flip']} flips, {run.actions['lend']} lends{refused} (P:D {ratios})"


def comparison_rows(outcomes: list[Outcome]) -> list[list[str]]:
    rows = []
    for o in outcomes:
        ours, theirs = o.values
        fmt = o.comparison.fmt
        rows.append([f"{o.comparison.name} vs {o.comparison.baseline}{o.note}", o.comparison.metric, fmt.format(ours),
                     fmt.format(theirs), f"{o.change:+.0%}", o.comparison.paper])
    return rows


COMPARISON_HEAD = ["comparison", "metric", "pdmesh", "baseline", "change", "P/D-Serve reports"]


def comparison_table(outcomes: list[Outcome], title: str) -> Table:
    table = Table(title=title)
    for i, head in enumerate(COMPARISON_HEAD):
        table.add_column(head, justify="right" if 2 <= i <= 4 else "left")
    for row in comparison_rows(outcomes):
        table.add_row(*row)
    return table


def comparison_markdown(outcomes: list[Outcome]) -> str:
    lines = ["| " + " | ".join(COMPARISON_HEAD) + " |", "|" + "---|" * len(COMPARISON_HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(outcomes)]
    return "\n".join(lines)


def plot(runs: dict[str, Run], folder: str | Path) -> list[Path]:
    """PNGs: TTFT distribution per run, and each scenario's prefill share over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install matplotlib") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run in runs.items():
        ttft = np.sort(run.ttft[np.isfinite(run.ttft)])
        ax.plot(ttft, np.arange(1, len(ttft) + 1) / len(run.ttft), label=label)
    ax.set(xscale="log", xlabel="TTFT (s)", ylabel="share of requests", title="TTFT (rejected: never)")
    ax.legend()
    written.append(_save(fig, folder / "ttft_cdf.png"))
    for label, run in runs.items():
        if not run.timeline:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, name in enumerate(run.names):
            points = [(t, p / max(p + d, 1)) for t, pool, p, d in run.timeline if pool == k]
            ax.step(*zip(*points), where="post", label=name)
        ax.set(xlabel="simulated time (s)", ylabel="prefill share of actors", title=f"ratio over time: {label}")
        ax.legend()
        written.append(_save(fig, folder / f"ratio_{label.replace(' ', '_')}.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
