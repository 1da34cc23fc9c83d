"""`pdmesh bench transport --tp`: head-sliced KV between tensor-parallel sides, real UCX on loopback
(one receiving and one sending peer process, each holding its ranks' pools), at a tiny size."""
from __future__ import annotations

import json

from click.testing import CliRunner

from transport.bench import command

TINY = ["--tokens", "21", "--layers", "2", "--kv-heads", "4", "--head-dim", "8", "--block-size", "4",
        "--rounds", "1"]


def test_each_pair_moves_the_same_kv_in_its_parts_against_1_1_in_the_same_run():
    result = CliRunner().invoke(command, ["--tp", "2:1,1:2,4:2", *TINY, "--output", "json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    rows = {r["tp"]: r for r in out["rows"]}
    assert list(rows) == ["1:1", "2:1", "1:2", "4:2"]  # 1:1, the baseline, although not asked for
    assert {r["mib"] for r in rows.values()} == {2 * 2 * 21 * 4 * 8 * 2 / 2**20}  # every byte once, bf16
    # (parts, ranks sending them): a part per receiving rank and sender's rank boundary
    assert {tp: (r["parts"], r["sending_ranks"]) for tp, r in rows.items()} == \
        {"1:1": (1, 1), "2:1": (2, 2), "1:2": (2, 1), "4:2": (4, 4)}
    # head slices move in runs as whole pools do (the wider pool's side copies its strided slice)
    assert {r["strategy"] for r in rows.values()} == {"contiguous"}
    assert rows["1:1"]["over_1_1"] == 1.0 and all(r["mbps"] > 0 and r["runs"] > 0 for r in rows.values())
    table = CliRunner().invoke(command, ["--tp", "1:1", *TINY])
    assert table.exit_code == 0 and "time /" in table.output and "1.00x" in table.output, table.output


def test_degrees_that_do_not_fit_are_refused_with_what_to_change():
    runner = CliRunner()
    bad = runner.invoke(command, ["--tp", "3:1"])
    assert bad.exit_code != 0 and "3:1: each pair is prefill:decode, each degree 1, 2 or 4" in bad.output
    bad = runner.invoke(command, ["--tp", "1:2:4,2"])
    assert bad.exit_code != 0 and "1:2:4, 2: each pair is prefill:decode" in bad.output
    bad = runner.invoke(command, ["--tp", "2-1"])
    assert bad.exit_code != 0 and "write prefill:decode degrees" in bad.output
    uneven = runner.invoke(command, ["--tp", "4:1", "--kv-heads", "2"])
    assert uneven.exit_code != 0 and "2 KV heads do not split evenly across [4] ranks" in uneven.output
    gpu = runner.invoke(command, ["--tp", "2:1", "--device", "cuda"])
    assert gpu.exit_code != 0 and "--tp moves CPU pools on this host" in gpu.output
    local = runner.invoke(command, ["--tp", "2:1", "--backends", "local"])
    assert local.exit_code != 0 and "--tp runs on one wire backend" in local.output
