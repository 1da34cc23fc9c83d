"""`pdmesh bench transport` at a tiny size, in process: every figure and ratio is there."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from click.testing import CliRunner

from transport.bench import command


def test_tiny_run_reports_every_figure():
    args = ["--tokens", "16,48", "--backends", "local", "--strategies", "contiguous,blocks",
            "--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--block-size", "4",
            "--rounds", "1", "--output", "json"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    rows = {(r["tokens"], r["backend"], r["strategy"]): r for r in out["rows"]}
    assert set(rows) == {(t, b, s) for t in (16, 48)
                         for b, s in (("memcpy", "-"), ("local", "contiguous"), ("local", "blocks"))}
    assert rows[48, "local", "blocks"]["ops"] == 2 * 2 * 12  # layers x K/V x blocks
    assert rows[48, "local", "contiguous"]["runs"] == 1
    assert all(r["gbps"] > 0 for r in out["rows"])
    assert {(r["tokens"], r["backend"]) for r in out["ratios"]} == {(16, "local"), (48, "local")}


def test_table_output():
    result = CliRunner().invoke(command, ["--tokens", "8", "--backends", "local", "--layers", "1",
                                          "--kv-heads", "1", "--head-dim", "8", "--rounds", "1"])
    assert result.exit_code == 0, result.output
    assert "contiguous / blocks" in result.output and "BASELINES.md" in result.output


def test_unknown_backend_is_refused():
    result = CliRunner().invoke(command, ["--backends", "local,rdma"])
    assert result.exit_code != 0 and "unknown rdma" in result.output


def test_across_namespaces_sets_both_backends_beside_a_socket_copy():
    from transport.netns import unavailable

    reason = unavailable()
    if reason:
        pytest.skip(f"needs network namespaces: {reason}")
    args = ["--tokens", "16,48", "--strategies", "contiguous", "--layers", "2", "--kv-heads", "2",
            "--head-dim", "8", "--block-size", "4", "--rounds", "1", "--across-namespaces", "--output", "json"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    rows = {(r["tokens"], r["backend"], r["strategy"]) for r in out["rows"]}
    assert rows == {(t, b, s) for t in (16, 48) for b, s in (("memcpy", "-"), ("ucx-tcp", "contiguous"),
                                                             ("tcp", "contiguous"), ("socket", "-"))}
    assert all(r["contiguous_over_socket"] > 0 for r in out["ratios"]) and out["across_namespaces"]
    made_here = f"pdmb{os.getpid() % 100000}-"  # NamespaceNet's names: they are gone again
    assert made_here not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_shared_memory_backends_cannot_cross_namespaces():
    result = CliRunner().invoke(command, ["--across-namespaces", "--backends", "ucx,tcp"])
    assert result.exit_code != 0 and "ucx cannot cross namespaces" in result.output


def test_both_paths_in_one_run_with_their_ratio():
    args = ["--tokens", "48", "--backends", "tcp,local", "--strategies", "contiguous", "--path", "direct,staged",
            "--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--block-size", "4", "--rounds", "1",
            "--output", "json"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    rows = {(r["backend"], r["path"]): r for r in out["rows"]}
    # the local backend has no wire to stage for: direct only
    assert set(rows) == {("memcpy", "-"), ("tcp", "direct"), ("tcp", "staged"), ("local", "direct")}
    assert all(r["used_path"] == r["path"] for r in out["rows"] if r["backend"] != "memcpy")
    ratio = {(r["backend"], r["path"]): r["staged_over_direct"] for r in out["ratios"]}
    assert ratio[("tcp", "staged")] > 0 and ratio[("tcp", "direct")] is None
    table = CliRunner().invoke(command, args[:-2])
    assert table.exit_code == 0 and "staged /" in table.output, table.output  # its column


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the cuda run is tested below")
def test_device_cuda_without_a_gpu_says_so_and_measures_nothing():
    for output in ("table", "json"):
        result = CliRunner().invoke(command, ["--device", "cuda", "--output", output])
        assert result.exit_code == 0, result.output
        assert "--device cuda skipped: no CUDA GPU here" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_device_cuda_against_a_copy_on_the_gpu():
    args = ["--device", "cuda", "--tokens", "64", "--strategies", "contiguous", "--path", "direct,staged",
            "--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--rounds", "1", "--output", "json"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["device"] == "cuda" and out["layout"]["device"] == "cuda:0"
    assert {(r["backend"], r["path"]) for r in out["rows"]} >= {("ucx", "staged"), ("local", "direct")}
