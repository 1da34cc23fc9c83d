"""Simulation results as terminal tables (rich), Markdown (for the README) and PNG plots."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from scenarios.spec import ScenarioSpec
from simtests.compare import Outcome
from simtests.results import DONE, Run
from simtests.workload import Workload

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


def bounds(outcomes: list[Outcome]) -> list[str]:
    """The comparisons' bounds on this load (`Comparison.bound`), one line each."""
    return [f"bound of {o.comparison.name} vs {o.comparison.baseline}: {o.bound}" for o in outcomes if o.bound]


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
    below = bounds(outcomes)
    return "\n".join(lines + ([""] + below if below else []))


@dataclass(frozen=True)
class Split:
    """One scenario's prefill and decode actors at each control step, and the steps at which
    the controller's actions changed them (its decisions that took effect)."""
    t: np.ndarray
    prefill: np.ndarray
    decode: np.ndarray
    decisions: np.ndarray  # times


def splits(run: Run) -> dict[str, Split]:
    """By scenario, from the run's controller timeline (empty without a controller)."""
    out = {}
    for k, name in enumerate(run.names):
        rows = np.array([(t, p, d) for t, pool, p, d in run.timeline if pool == k], dtype=float).reshape(-1, 3)
        changed = np.any(np.diff(rows[:, 1:], axis=0) != 0, axis=1)
        out[name] = Split(rows[:, 0], rows[:, 1], rows[:, 2], rows[1:, 0][changed])
    return out


def goodput_over_time(run: Run, edges: np.ndarray) -> np.ndarray:
    """Requests within both targets per second per actor, by the window they ended in."""
    ended = run.done_at[run.ttft_ok & run.tpot_ok]
    return np.histogram(ended, edges)[0] / np.diff(edges) / run.actors


def load_over_time(workload: Workload, scenarios: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Arrivals/s and prompt tokens/s per scenario (rows), by window (columns)."""
    mine = [workload.scenario == k for k in range(scenarios)]
    width = np.diff(edges)
    rate = np.array([np.histogram(workload.arrival_s[m], edges)[0] for m in mine]) / width
    tokens = np.array([np.histogram(workload.arrival_s[m], edges, weights=workload.prompt[m])[0] for m in mine]) / width
    return rate, tokens


def plot(runs: dict[str, Run], folder: str | Path, specs: list[ScenarioSpec], workload: Workload,
         caption: str) -> list[Path]:
    """PNGs, each captioned with the load, the actors and the profile: TTFT and TPOT
    distributions per scenario with its SLO target marked, goodput and load over time, and each
    controlled run's P:D counts over time with the controller's decisions marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: F401
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install matplotlib") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    edges = np.linspace(0.0, max(max(r.end_s for r in runs.values()), 1e-9), 41)
    written = [_save(_cdfs(runs, specs, "ttft", caption), folder / "ttft_cdf.png"),
               _save(_cdfs(runs, specs, "tpot", caption), folder / "tpot_cdf.png"),
               _save(_goodput(runs, edges, caption), folder / "goodput_over_time.png"),
               _save(_load(workload, specs, edges, caption), folder / "load_over_time.png")]
    for label, run in runs.items():
        if run.timeline:
            written.append(_save(_splits(run, label, caption), folder / f"pd_counts_{label.replace(' ', '_')}.png"))
    return written


_WHAT = {"ttft": ("TTFT", "time to first token (s)", "ttft_s", "ttft_ok"),
         "tpot": ("TPOT", "time per output token after the first (s)", "tpot_s", "tpot_ok")}


def _grid(n: int, height: float = 3.2):
    import matplotlib.pyplot as plt

    cols = min(n, 2)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, height * rows + 0.8), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _cdfs(runs: dict[str, Run], specs: list[ScenarioSpec], metric: str, caption: str):
    """One panel per scenario: each run's CDF over the scenario's requests (one never served
    never arrives at 1), the SLO target as a red line, each run's share within it in the legend."""
    from matplotlib import ticker

    name, axis, target_field, ok_field = _WHAT[metric]
    fig, axes = _grid(len(specs))
    for k, (spec, ax) in enumerate(zip(specs, axes)):
        target = getattr(spec.slo, target_field)
        for label, run in runs.items():
            mine = run.scenario == k
            values = getattr(run, metric)[mine & (run.state == DONE)]
            values = np.sort(values[np.isfinite(values) & (values > 0)])
            within = getattr(run, ok_field)[mine].mean() if mine.any() else float("nan")
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / mine.sum(), where="post",
                        label=f"{label}: {within:.0%} within SLO")
        ax.axvline(target, color="red", linestyle="--", label=f"SLO {target:g} s")
        ax.set(xscale="log", xlabel=axis, ylabel="share of requests", ylim=(0, 1.02), title=spec.name)
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 0.2, not 2 x 10^-1
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{name} distribution per scenario, SLO target marked")
    return _captioned(fig, caption)


def _goodput(runs: dict[str, Run], edges: np.ndarray, caption: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    mid = (edges[:-1] + edges[1:]) / 2
    for label, run in runs.items():
        ax.plot(mid, goodput_over_time(run, edges), label=label)
    ax.set(xlabel="simulated time (s)", ylabel="requests within SLO / s / actor",
           title=f"goodput over time ({edges[1] - edges[0]:.0f} s windows)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _captioned(fig, caption)


def _load(workload: Workload, specs: list[ScenarioSpec], edges: np.ndarray, caption: str):
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    mid = (edges[:-1] + edges[1:]) / 2
    rate, tokens = load_over_time(workload, len(specs), edges)
    for k, spec in enumerate(specs):
        top.plot(mid, rate[k], label=spec.name)
        bottom.plot(mid, tokens[k], label=spec.name)
    top.set(ylabel="arrivals / s", title=f"offered load over time ({edges[1] - edges[0]:.0f} s windows)")
    bottom.set(ylabel="prompt tokens / s", xlabel="simulated time (s)")
    for ax in (top, bottom):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    top.legend(fontsize=8)
    return _captioned(fig, caption)


def _splits(run: Run, label: str, caption: str):
    from matplotlib import ticker

    fig, axes = _grid(len(run.names), height=2.8)
    for ax, (name, s) in zip(axes, splits(run).items()):
        ax.step(s.t, s.prefill, where="post", label="prefill actors", color="tab:blue", linewidth=2)
        ax.step(s.t, s.decode, where="post", label="decode actors", color="tab:orange", linestyle="--", linewidth=2)
        top = max(s.prefill.max(), s.decode.max()) if len(s.t) else 1
        for t in s.decisions:  # each marked with what it changed, e.g. "P+2 D-2"
            ax.axvline(t, color="grey", linestyle=":", linewidth=0.8)
            i = int(np.searchsorted(s.t, t))
            dp, dd = s.prefill[i] - s.prefill[i - 1], s.decode[i] - s.decode[i - 1]
            ax.annotate(f"P{dp:+.0f} D{dd:+.0f}", (t, top * 1.08), xytext=(3, 4), textcoords="offset points",
                        fontsize=7)
        ax.plot(s.decisions, np.full(len(s.decisions), top * 1.08), "v", color="black", markersize=5,
                label=f"controller decisions ({len(s.decisions)})")
        ax.set(xlabel="simulated time (s)", ylabel="actors", title=name, ylim=(0, top * 1.3 + 0.5))
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    refused = f", {run.actions['refused']} refused" if run.actions.get("refused") else ""
    fig.suptitle(f"P:D over time: {label} ({run.actions['flip']} flips, {run.actions['lend']} lends{refused})")
    return _captioned(fig, caption)


def _captioned(fig, caption: str):
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=8, wrap=True)
    return fig


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
