"""Trace rows to scenarios, and the synthetic mixes."""
import numpy as np
import pytest

from scenarios.spec import parse_specs
from simtests.cluster import scaled
from simtests.traces import TraceError, read_trace
from simtests.workload import Mix, classify, synthetic

SPECS = parse_specs({"scenarios": [
    {"name": "gpt4-api", "model": "m", "match": {"tags": ["GPT-4"], "max_prompt_tokens": 1000},
     "slo": {"ttft_s": 1, "tpot_s": 0.1}, "prefill": 3, "decode": 1},
    {"name": "rest", "model": "m", "slo": {"ttft_s": 2, "tpot_s": 0.1}, "prefill": 1, "decode": 1},
]})


def test_burstgpt_rows_map_by_model_tag_and_length(tmp_path):
    f = tmp_path / "b.csv"
    f.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "1,GPT-4,100,5,105,API log\n2,ChatGPT,100,5,105,Conversation log\n3,GPT-4,5000,5,5005,API log\n")
    assert classify(read_trace(f), SPECS).tolist() == [0, 1, 1]


def test_a_row_no_scenario_takes_is_an_error(tmp_path):
    f = tmp_path / "b.csv"
    f.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,ChatGPT,100,5,105,API log\n")
    with pytest.raises(TraceError, match="row 1: no scenario matches"):
        classify(read_trace(f), SPECS[:1] + parse_specs({"scenarios": [
            {"name": "x", "model": "m", "match": {"min_prompt_tokens": 500}, "slo": {"ttft_s": 1, "tpot_s": 1}}]}))


def rate_by_window(w, scenario, window):
    t = w.arrival_s[w.scenario == scenario]
    return np.histogram(t, bins=np.arange(0, t.max() + window, window))[0]


def test_tidal_scenarios_swing_out_of_phase():
    w = synthetic([Mix(0, 10.0, 100, 10), Mix(1, 10.0, 100, 10)], duration_s=1200, shape="tidal", period_s=600)
    day, night = rate_by_window(w, 0, 50), rate_by_window(w, 1, 50)
    assert day.max() > 3 * day.min() and np.argmax(day[:12]) != np.argmax(night[:12])
    assert np.all(np.diff(w.arrival_s) >= 0)


def test_bursts_carry_most_of_the_load_in_a_tenth_of_the_time():
    w = synthetic([Mix(0, 10.0, 100, 10)], duration_s=1000, shape="bursty", period_s=100, seed=1)
    per_10s = rate_by_window(w, 0, 10)
    assert per_10s[0] > 5 * np.median(per_10s)


def test_same_seed_same_load_and_fixed_lengths():
    one, two = (synthetic([Mix(0, 5.0, 300, 20, spread=False)], 100, seed=9) for _ in range(2))
    assert np.array_equal(one.arrival_s, two.arrival_s) and set(one.prompt.tolist()) == {300}


def test_specs_scale_to_a_cluster_size_keeping_the_split():
    big = scaled(SPECS, 1000)
    assert [(s.prefill, s.decode) for s in big] == [(500, 167), (167, 166)]
    assert sum(s.prefill + s.decode for s in scaled(SPECS, 7)) == 7
    assert all(s.prefill >= 1 and s.decode >= 1 for s in scaled(SPECS, 4))
