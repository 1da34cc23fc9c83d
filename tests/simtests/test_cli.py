"""`pdmesh sim` through the console script's group."""
import json
import sys

import pytest
from click.testing import CliRunner

from gateway.cli import main

TINY = ["--actors", "8", "--duration", "60", "--mix", "short:4:500:50", "--mix", "long:1:12000:100"]


def sim(*args):
    return CliRunner().invoke(main, ["sim", *args])


def test_one_run_prints_the_tables_and_the_speed():
    r = sim(*TINY, "--shape", "tidal", "--period", "30")
    assert r.exit_code == 0, r.output
    assert "synthetic tidal" in r.output and "llama3-8b-h100" in r.output
    assert "events/s" in r.output and "TTFT p99 s" in r.output and "in 2 scenarios" in r.output


def test_comparisons_as_json_and_markdown():
    r = sim(*TINY, "--compare", "transfer", "--compare", "placement", "--output", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data["runs"]) == {"pdmesh", "block-fixed transfer", "central scheduler, queue reports 1 interval stale"}
    assert [c["metric"] for c in data["comparisons"]] == ["mean KV transfer time (ms)", "TTFT attainment"]
    r = sim(*TINY, "--compare", "transfer", "--output", "markdown")
    assert r.exit_code == 0 and r.stdout.startswith("| comparison | metric |") and "-46% transfer time" in r.stdout


def test_a_trace_file(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(f'{{"timestamp": {i * 200}, "input_length": {1000 + 3000 * (i % 4)}, "output_length": 20, '
                         f'"hash_ids": [{i}]}}\n' for i in range(40)))
    r = sim("--trace", str(f), "--actors", "8", "--repeat", "3", "--output", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["runs"]["pdmesh"]["scenarios"][-1]["requests"] == 120


def _short_trace(tmp_path, rows: int = 30):
    """A Mooncake trace whose prompts all fall in mooncake-4.yaml's `short` scenario."""
    f = tmp_path / "short.jsonl"
    f.write_text("".join(f'{{"timestamp": {i * 100}, "input_length": {500 + 10 * i}, "output_length": 20, '
                         f'"hash_ids": [{i}]}}\n' for i in range(rows)))
    return f


def test_the_default_scenarios_are_those_the_trace_has_requests_for(tmp_path):
    r = sim("--trace", str(_short_trace(tmp_path)), "--actors", "4", "--output", "json")
    assert r.exit_code == 0, r.output
    assert [s["scenario"] for s in json.loads(r.stdout)["runs"]["pdmesh"]["scenarios"]
            if s["scenario"] != "all"] == ["short"]
    assert "warning" not in r.stderr


def test_scenarios_of_a_given_file_without_requests_are_named_on_stderr(tmp_path):
    from simtests.cli import DEFAULT_SCENARIOS

    r = sim("--trace", str(_short_trace(tmp_path)), "--scenarios", str(DEFAULT_SCENARIOS), "--actors", "8",
            "--output", "json")
    assert r.exit_code == 0, r.output
    assert "pdmesh sim: warning: scenarios medium, long, xlong of" in r.stderr and "no requests" in r.stderr
    assert "warning" not in r.stdout
    json.loads(r.stdout)  # the figures still come, whole


@pytest.mark.parametrize("args, message", [
    ([], "give either --trace FILE or --mix"),
    (["--mix", "chat:1:2:3"], "--mix names unknown scenarios ['chat']"),
    (["--mix", "short:x"], "expected SCENARIO:RATE:PROMPT:OUTPUT"),
    (["--mix", "short:1:100:10", "--profile", "nope"], "no built-in profile 'nope'"),
    (["--mix", "short:1:100:10", "--actors", "1"], "need at least one actor per role"),
])
def test_bad_input_says_what_to_fix(args, message):
    r = sim(*args)
    assert r.exit_code != 0 and message in r.output


def test_plots_are_written_as_png(tmp_path):
    folder = tmp_path / "plots"
    r = sim(*TINY, "--plot", str(folder))
    assert r.exit_code == 0, r.output
    pngs = sorted(folder.glob("*.png"))
    assert {p.name for p in pngs} == {"ttft_cdf.png", "tpot_cdf.png", "goodput_over_time.png", "load_over_time.png",
                                      "pd_counts_pdmesh.png"}, pngs
    for png in pngs:
        data = png.read_bytes()
        # a figure with axes and a curve is tens of kB; an empty or failed save is not
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, (png, len(data))


def test_plots_without_matplotlib_say_what_to_install(tmp_path, monkeypatch):
    # matplotlib is a dependency now, but a broken environment should still get the hint, not a traceback
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = sim(*TINY, "--plot", str(tmp_path / "plots"))
    assert r.exit_code != 0 and "plots need matplotlib: pip install matplotlib" in r.output


def test_the_plotted_series_are_the_runs_figures():
    """What the over-time plots draw: goodput windows add up to the requests within SLO, load
    windows to the arrivals, and a decision is marked at each control step that changed P:D."""
    import numpy as np

    from scenarios.controller import Settings
    from simtests import report
    from simtests.cli import DEFAULT_SCENARIOS
    from simtests.cluster import Variant, load_cluster
    from simtests.sim import Simulator
    from simtests.workload import Mix, synthetic

    cluster = load_cluster(DEFAULT_SCENARIOS, "llama3-8b-h100", 8, Settings(interval_s=5), frozenset({"short", "long"}))
    workload = synthetic([Mix(0, 20, 500, 50), Mix(1, 2, 12000, 100)], 120, "tidal", 0, 60)
    run = Simulator(cluster, Variant()).run(workload)
    edges = np.linspace(0, run.end_s, 41)
    goodput = report.goodput_over_time(run, edges)
    assert np.isclose((goodput * np.diff(edges)).sum() * run.actors, (run.ttft_ok & run.tpot_ok).sum())
    rate, tokens = report.load_over_time(workload, 2, edges)
    assert np.isclose((rate * np.diff(edges)).sum(), len(workload))
    assert np.isclose((tokens * np.diff(edges)).sum(), workload.prompt.sum())
    splits = report.splits(run)
    assert set(splits) == {"short", "long"}
    for name, s in splits.items():
        steps = [(t, p, d) for t, p, d in zip(s.t, s.prefill, s.decode)]
        changed = [t for (_, p0, d0), (t, p, d) in zip(steps, steps[1:]) if (p, d) != (p0, d0)]
        assert list(s.decisions) == changed, name
    assert sum(len(s.decisions) for s in splits.values()) >= 1, "a tide that moves no actor tests nothing here"
