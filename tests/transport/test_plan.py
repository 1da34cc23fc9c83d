"""Transfer plans: maximal runs, block-size conversion, strategies and bad inputs."""
from __future__ import annotations

import pytest
import torch

from transport.plan import Strategy, build_plan
from tests.transport.support import make_layout


def test_contiguous_blocks_make_one_run_per_layer_and_kv():
    lay = make_layout()
    plan = build_plan(lay, [4, 5, 6], lay, [10, 11, 12], 20)
    assert (plan.strategy, plan.runs, plan.ops_per_layer) == (Strategy.CONTIGUOUS, 1, 2)
    tb = lay.token_bytes
    assert plan.byte_ranges(1, "src") == [((2 * 1 + 0) * lay.slots * tb + 32 * tb, 20 * tb),
                                          ((2 * 1 + 1) * lay.slots * tb + 32 * tb, 20 * tb)]
    assert plan.total_bytes == lay.num_layers * 2 * 20 * tb


def test_runs_break_where_either_side_breaks():
    lay = make_layout(block_size=4)
    # source runs: [0,1] [7]; destination runs: [2] [3,4]: breaks at tokens 4 and 8
    plan = build_plan(lay, [0, 1, 7], lay, [2, 9, 10], 12)
    assert plan.run_starts.tolist() == [0, 4, 8]
    assert plan.run_lengths.tolist() == [4, 4, 4]


def test_different_block_sizes_convert_token_by_token():
    src, dst = make_layout(block_size=4), make_layout(block_size=16, num_blocks=16)
    plan = build_plan(src, [0, 1, 2, 3, 4], dst, [3, 4], 20)
    assert plan.runs == 1
    assert plan.src_slots.tolist() == list(range(20))
    assert plan.dst_slots.tolist() == list(range(48, 68))


def test_blocks_strategy_cuts_every_block_of_either_side():
    src, dst = make_layout(block_size=4), make_layout(block_size=8)
    plan = build_plan(src, list(range(8)), dst, list(range(4)), 30, Strategy.BLOCKS)
    assert plan.runs == 8 and plan.ops_per_layer == 16


def test_fragmentation_past_the_threshold_gathers():
    lay = make_layout(block_size=1)
    ids = list(range(0, 64, 2))  # 32 runs of one token
    assert build_plan(lay, ids, lay, ids, 32, gather_threshold=32).strategy is Strategy.CONTIGUOUS
    plan = build_plan(lay, ids, lay, ids, 32, gather_threshold=31)
    assert plan.strategy is Strategy.GATHER and plan.staged and plan.ops_per_layer == 1


def test_dtype_or_device_change_goes_through_staging():
    plan = build_plan(make_layout(), [0], make_layout(dtype=torch.float32), [0], 8)
    assert plan.staged
    assert plan.wire_token_bytes == make_layout(dtype=torch.float32).token_bytes
    assert build_plan(make_layout(device="npu"), [0], make_layout(), [0], 8).staged


@pytest.mark.parametrize("change, args, message", [
    ({"num_layers": 3}, {}, "layers, kv_heads or head_dim"),
    ({"kv_heads": 4}, {}, "layers, kv_heads or head_dim"),
    ({}, {"num_tokens": 0}, "positive"),
    ({}, {"num_tokens": 17}, "cannot hold 17 tokens"),
    ({}, {"dst_ids": [0, 64]}, "destination block id out of range"),
    ({}, {"src_ids": [-1, 0]}, "source block id out of range"),
    ({"dtype": torch.float32}, {"strategy": "blocks"}, "layouts must share dtype"),
    ({}, {"strategy": "bogus"}, "bogus"),
])
def test_bad_plans_say_why(change, args, message):
    src, dst = make_layout(), make_layout(**change)
    with pytest.raises(ValueError, match=message):
        build_plan(src, args.get("src_ids", [0, 1]), dst, args.get("dst_ids", [0, 1]),
                   args.get("num_tokens", 16), args.get("strategy", "contiguous"))
