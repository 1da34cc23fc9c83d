"""`pdmesh bench serve --plot`'s figures, from a made-up run (the load itself is tested in
test_bench_serve.py): every PNG is written, and the series over time count the outcomes."""
from __future__ import annotations

import pytest

from gateway.bench_serve_load import LoadResult, Outcome
from gateway.bench_serve_report import Slo, over_time, plot

SLO = Slo(ttft_s=2.0, tpot_s=0.2)


def _run() -> LoadResult:
    ok = [Outcome(i, i * 0.5, "ok", 10, 5, ttft_s=0.5 + (i % 5), e2e_s=1.0 + (i % 5), itl_s=(0.1,) * 4)
          for i in range(20)]
    refused = [Outcome(20 + i, 10.0 + i, "429", 10, 0, message="busy") for i in range(3)]
    return LoadResult(tuple(ok + refused), 23, 15.0)


def test_series_over_time_count_what_was_sent_answered_and_within_slo():
    run = _run()
    edges = [0.0, 5.0, 10.0, 15.0]
    series = over_time(run, SLO, edges)
    per_window = lambda rates: [r * 5.0 for r in rates]  # noqa: E731
    assert per_window(series["sent"]) == [10, 10, 3]  # sent at 0, 0.5 .. 9.5; then 10, 11, 12 (refused)
    assert sum(per_window(series["answered"])) == 20
    assert sum(per_window(series["within_slo"])) == sum(SLO.met(o) for o in run.outcomes) == 8


def test_every_plot_is_written(tmp_path):
    written = plot({"pdmesh": _run(), "vllm": _run()}, SLO, tmp_path, "20 random requests to tiny at inf requests/s")
    assert {p.name for p in written} == {"ttft_cdf.png", "tpot_cdf.png", "latency_over_time.png",
                                         "goodput_over_time.png", "load_over_time.png"}
    for png in written:
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, (png, len(data))


@pytest.mark.parametrize("slo", [Slo(), SLO])
def test_plots_need_no_slo(tmp_path, slo):
    assert len(plot({"run": _run()}, slo, tmp_path)) == 5
