"""`pdmesh bench serve`'s figures from a load run's outcomes: the report (one JSON object per run),
its table, the ratio of two runs, and plots.

A run's report (`--output json` prints it; two runs print {"runs": {label: report}, "ratio":
{figure: ours over baseline}}):

    label, base_url, endpoint, model
    requests: planned, sent, completed, rejected, failed, not_sent
        (sent = completed + rejected + failed; planned = sent + not_sent)
    rejected_by_status: {"429": n, "503": n}; failed_by_status: {"500": n, "timeout": n, ...}
    messages: {status: the first rejected or failed request's message under that status}
    duration_s: from the first send to the last answer
    request_throughput: completed requests/s
    request_goodput: completed requests/s within every SLO given (null without SLOs)
    slo_attainment: share of sent requests within every SLO (rejected and failed ones miss)
    slo: {ttft_s, tpot_s, e2el_s} (null where not given)
    input_tokens, output_tokens (of completed requests), input_tokens_per_s, output_tokens_per_s
    latency_ms: {ttft|tpot|itl|e2el: {mean, p50, p90, p99, ...}} for the metrics and percentiles asked
"""
from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.bench_serve_load import LoadResult, Outcome
from mesh import percentile

METRICS = ("ttft", "tpot", "itl", "e2el")
_RATES = {"duration_s": "duration (s)", "request_throughput": "requests/s", "request_goodput": "goodput (requests/s)",
          "slo_attainment": "SLO attainment", "output_tokens_per_s": "output tokens/s",
          "input_tokens_per_s": "input tokens/s"}


@dataclass(frozen=True)
class Slo:
    """Per-request targets in seconds; None: not a condition."""
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2el_s: float | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def met(self, o: Outcome) -> bool:
        tpot = o.tpot_s
        return (o.completed and (self.ttft_s is None or o.ttft_s <= self.ttft_s)
                and (self.tpot_s is None or tpot is None or tpot <= self.tpot_s)
                and (self.e2el_s is None or o.e2e_s <= self.e2el_s))


def parse_goodput(pairs: tuple[str, ...]) -> dict[str, float]:
    """vLLM's --goodput "ttft:MS tpot:MS e2el:MS" as seconds by metric."""
    out = {}
    for pair in (p for item in pairs for p in item.split()):
        name, _, value = pair.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if name not in ("ttft", "tpot", "e2el") or not ms > 0:
            raise ValueError(f"--goodput {pair!r}: write KEY:MILLISECONDS with KEY ttft, tpot or e2el and a "
                             "positive number, e.g. --goodput ttft:2000 tpot:200")
        out[name] = ms / 1e3
    return out


def _values(outcomes: list[Outcome], metric: str) -> list[float]:
    done = [o for o in outcomes if o.completed]
    if metric == "ttft":
        return [o.ttft_s for o in done]
    if metric == "tpot":
        return [o.tpot_s for o in done if o.tpot_s is not None]
    if metric == "itl":
        return [gap for o in done for gap in o.itl_s]
    return [o.e2e_s for o in done]


def _stats(values: list[float], percentiles: tuple[float, ...]) -> dict:
    ms = [v * 1e3 for v in values]
    out = {"mean": sum(ms) / len(ms) if ms else math.nan}
    out.update({f"p{q:g}": percentile(ms, q) for q in percentiles})
    return out


def summarize(result: LoadResult, slo: Slo, label: str = "", where: dict | None = None,
              metrics: tuple[str, ...] = METRICS, percentiles: tuple[float, ...] = (50, 90, 99)) -> dict:
    outcomes = list(result.outcomes)
    done = [o for o in outcomes if o.completed]
    rejected = Counter(o.status for o in outcomes if o.rejected)
    failed = Counter(o.status for o in outcomes if not o.completed and not o.rejected)
    seconds = max(result.duration_s, 1e-9)
    good = sum(slo.met(o) for o in outcomes) if slo.given else None
    input_tokens, output_tokens = sum(o.prompt_tokens for o in done), sum(o.output_tokens for o in done)
    return {
        "label": label, **(where or {}),
        "requests": {"planned": result.planned, "sent": len(outcomes), "completed": len(done),
                     "rejected": sum(rejected.values()), "failed": sum(failed.values()),
                     "not_sent": result.planned - len(outcomes)},
        "rejected_by_status": dict(sorted(rejected.items())), "failed_by_status": dict(sorted(failed.items())),
        "messages": {status: next(o.message for o in outcomes if o.status == status)
                     for status in sorted({*rejected, *failed})},
        "duration_s": result.duration_s,
        "request_throughput": len(done) / seconds,
        "request_goodput": None if good is None else good / seconds,
        "slo_attainment": None if good is None or not outcomes else good / len(outcomes),
        "slo": asdict(slo),
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "input_tokens_per_s": input_tokens / seconds, "output_tokens_per_s": output_tokens / seconds,
        "latency_ms": {m: _stats(_values(outcomes, m), percentiles) for m in metrics},
    }


def figures(report: dict) -> dict[str, float | int]:
    """The report's numbers under flat names ("ttft p90 ms"), in the table's order."""
    r = report["requests"]
    out: dict[str, float | int] = {f"requests {k.replace('_', ' ')}": v for k, v in r.items()}
    out.update({f"rejected {s}": n for s, n in report["rejected_by_status"].items()})
    out.update({f"failed {s}": n for s, n in report["failed_by_status"].items()})
    out.update({name: report[key] for key, name in _RATES.items() if report[key] is not None})
    for metric, stats in report["latency_ms"].items():
        out.update({f"{metric} {name} ms": value for name, value in stats.items()})
    return out


def ratio(ours: dict, baseline: dict) -> dict[str, float | None]:
    """ours / baseline for each figure both runs have (None where the baseline's is 0 or missing)."""
    a, b = figures(ours), figures(baseline)
    return {k: (a[k] / b[k] if b.get(k) and not math.isnan(b[k]) else None) for k in a if k in b}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return "nan" if math.isnan(v) else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"


def print_table(reports: dict[str, dict], title: str) -> None:
    """One column per run; with two runs, a last column: the second over the first."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("figure")
    labels = list(reports)
    for label in labels:
        table.add_column(label, justify="right")
    both = len(labels) == 2
    if both:
        table.add_column(f"{labels[1]}/{labels[0]}", justify="right")
        over = ratio(reports[labels[1]], reports[labels[0]])
    rows = {k: None for report in reports.values() for k in figures(report)}
    for key in rows:
        cells = [_fmt(figures(reports[label]).get(key)) for label in labels]
        if both:
            cells.append("-" if over.get(key) is None else f"{over[key]:.2f}x")
        table.add_row(key, *cells)
    Console().print(table)


def over_time(result: LoadResult, slo: Slo, edges: list[float]) -> dict[str, list[float]]:
    """Per window of send time (sent) or of answer time (answered, within_slo), in requests/s."""
    def rate(times: list[float]) -> list[float]:
        counts = [0] * (len(edges) - 1)
        for t in times:  # the last window holds its right edge: the last answer
            counts[min(bisect.bisect_right(edges, t) - 1, len(counts) - 1)] += 1
        return [n / (hi - lo) for n, lo, hi in zip(counts, edges, edges[1:])]

    done = [o for o in result.outcomes if o.completed]
    return {"sent": rate([o.sent_s for o in result.outcomes]),
            "answered": rate([o.sent_s + o.e2e_s for o in done]),
            "within_slo": rate([o.sent_s + o.e2e_s for o in done if slo.met(o)])}


def plot(runs: dict[str, LoadResult], slo: Slo, folder: str | Path, caption: str = "") -> list[Path]:
    """ttft_cdf.png and tpot_cdf.png (the SLO target marked), latency_over_time.png (TTFT and
    end-to-end by send time), goodput_over_time.png and load_over_time.png; each captioned with
    the load (`caption`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=8, wrap=True)
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        written.append(folder / name)

    for metric, target, axis in (("ttft", slo.ttft_s, "time to first token (s)"),
                                 ("tpot", slo.tpot_s, "time per output token after the first (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.3))
        for label, result in runs.items():
            values = sorted(_values(list(result.outcomes), metric))
            within = f": {sum(v <= target for v in values) / len(values):.0%} within SLO" if target and values else ""
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=label + within)
        if target is not None:
            ax.axvline(target, color="red", linestyle="--", label=f"{metric.upper()} SLO {target:g} s")
        ax.set(xlabel=axis, ylabel="share of completed requests", ylim=(0, 1.02), title=f"{metric.upper()} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, f"{metric}_cdf.png")

    fig, ax = plt.subplots(figsize=(7, 4.3))
    for label, result in runs.items():
        done = [o for o in result.outcomes if o.completed]
        ax.plot([o.sent_s for o in done], [o.ttft_s for o in done], ".", label=f"{label} TTFT")
        ax.plot([o.sent_s for o in done], [o.e2e_s for o in done], "x", label=f"{label} end to end")
    ax.set(xlabel="sent at (s from start)", ylabel="latency (s)", title="latency over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "latency_over_time.png")

    end = max(max((o.sent_s + (o.e2e_s or 0.0) for o in r.outcomes), default=0.0) for r in runs.values())
    windows = max(5, min(30, max(len(r.outcomes) for r in runs.values()) // 10))  # ~10 requests each, or more
    edges = [end * k / windows for k in range(windows + 1)] if end > 0 else [0.0, 1.0]
    series = {label: over_time(result, slo, edges) for label, result in runs.items()}
    fig, ax = plt.subplots(figsize=(7, 4.3))
    for label, s in series.items():
        ax.stairs(s["within_slo" if slo.given else "answered"], edges, label=label)
    ax.set(xlabel="s from start", ylabel="requests/s" + (" within SLO" if slo.given else " completed"),
           title=f"goodput over time ({edges[1] - edges[0]:.3g} s windows)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "goodput_over_time.png")

    fig, ax = plt.subplots(figsize=(7, 4.3))
    for label, s in series.items():
        sent = ax.stairs(s["sent"], edges, label=f"{label}: sent")
        ax.stairs(s["answered"], edges, linestyle="--", color=sent.get_edgecolor(), label=f"{label}: completed")
    ax.set(xlabel="s from start", ylabel="requests/s", title=f"load over time ({edges[1] - edges[0]:.3g} s windows)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "load_over_time.png")
    return written
