"""Trace readers on the published samples and on small hand-written files."""
from pathlib import Path

import numpy as np
import pytest

from simtests.traces import TraceError, read_trace, repeat

TRACES = Path("/work/shared/traces")
needs_samples = pytest.mark.skipif(not TRACES.exists(), reason="shared trace samples not present")


@needs_samples
@pytest.mark.parametrize("name, kind, rows", [
    ("mooncake_conversation_trace.jsonl", "mooncake", 12031),
    ("AzureLLMInferenceTrace_code.csv", "azure", 8819),
    ("burstgpt_1_first400.csv", "burstgpt", 383),  # 17 failed rows (0 response tokens) skipped
])
def test_samples_are_detected_and_read(name, kind, rows):
    t = read_trace(TRACES / name)
    assert (t.kind, len(t)) == (kind, rows)
    assert t.arrival_s[0] == 0 and np.all(np.diff(t.arrival_s) >= 0)
    assert t.prompt.min() >= 1 and t.output.min() >= 1


def test_mooncake_milliseconds_and_prefix_ids(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"timestamp": 1500, "input_length": 600, "output_length": 5, "hash_ids": [0, 2]}\n'
                 '{"timestamp": 500, "input_length": 1000, "output_length": 7, "hash_ids": [0, 1]}\n')
    t = read_trace(f, time_scale=0.5)
    assert t.arrival_s.tolist() == [0.0, 0.5]  # sorted, from 0, then halved
    assert t.prompt.tolist() == [1000, 600] and t.prefix_ids(1) == [0, 2]


def test_azure_fractional_timestamps(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17:04.0319600,3180,8")
    t = read_trace(f)
    assert t.arrival_s[1] == pytest.approx(0.052)


def test_burstgpt_tags_and_failed_rows(tmp_path):
    f = tmp_path / "b.csv"
    f.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5,ChatGPT,472,18,490,Conversation log\n6,GPT-4,100,0,100,API log\n9,GPT-4,50,3,53,API log\n")
    t = read_trace(f)
    assert t.tags == [("ChatGPT", "Conversation log"), ("GPT-4", "API log")]
    assert "1 rows with 0 response tokens" in t.notes[0]


@pytest.mark.parametrize("text, message", [
    ("a,b\n1,2\n", "unknown trace format"),
    ('{"timestamp": 0, "input_length": 5}\n', "missing 'output_length'"),
    ('{"timestamp": 0, "input_length": 0, "output_length": 3}\n', "both must be at least 1"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,1\n", "row 2"),
])
def test_bad_files_say_what_to_fix(tmp_path, text, message):
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(TraceError, match=message):
        read_trace(f)


def test_repeat_overlays_copies_with_distinct_prefixes(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(f'{{"timestamp": {i * 1000}, "input_length": {100 + i}, "output_length": 2, '
                         f'"hash_ids": [0, {i + 1}]}}\n' for i in range(4)))
    t = read_trace(f)
    r = repeat(t, 3)
    assert len(r) == 12 and np.all(np.diff(r.arrival_s) >= 0) and r.arrival_s.max() < t.duration_s
    assert sorted(r.prompt.tolist()) == sorted(t.prompt.tolist() * 3)
    ids = {tuple(r.prefix_ids(i)) for i in range(len(r))}
    assert len(ids) == 12 and {p[0] for p in ids} == {0, 5, 10}  # copy c's ids shifted by c * 5
    with pytest.raises(TraceError, match="at least 1"):
        repeat(t, 0)
