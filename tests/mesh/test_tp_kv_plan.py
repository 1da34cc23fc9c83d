"""KV between tensor-parallel degrees: prefill TP=a into decode TP=b for a, b in {1, 2, 4}.
Each sending rank moves only its own heads, straight from its pool into the pool of each
receiving rank that holds them (real transport: in-process and TCP on loopback), and every
receiving rank ends up with exactly its heads of the whole-model KV."""
from __future__ import annotations

import itertools
import pytest
import torch

from mesh.engine.model_config import ModelConfig
from mesh.engine.shard import kv_head_ranges
from transport import TransportConfig, make_receiver, make_sender
from transport.heads import Part, parts, sending_ranks
from transport.layout import KVLayout
from transport.peer import ListReserver, read_tokens
from transport.plan import HeadSlice, Strategy, build_plan

SIZES = (1, 2, 4)
TOKENS = 21  # not a whole number of blocks
SECRET = "pdmesh-test-secret-0123456789"
# 8 query heads over a number of KV heads: what the sharding reads
MODEL = dict(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
             num_heads=8, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False,
             qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, sliding_window=None, rope={})


def rank_heads(kv_heads: int, tp: int) -> list[range]:
    """Each rank's KV heads, as the engine shards them."""
    return kv_head_ranges(ModelConfig(**{**MODEL, "num_kv_heads": kv_heads}), tp)


def layout(heads: int, num_blocks: int = 16) -> KVLayout:
    return KVLayout(2, num_blocks, 4, heads, 8, torch.float32)


def whole_kv(kv_heads: int) -> torch.Tensor:
    """The model's KV as one TP=1 pool would hold it."""
    lay = layout(kv_heads)
    return torch.randn(lay.shape, generator=torch.Generator().manual_seed(kv_heads))


async def move(kv_heads: int, a: int, b: int, backend: str,
               path: str = "auto") -> tuple[list[Part], list[tuple[int, HeadSlice]]]:
    """Prefill TP=a's ranks (pools cut from one model-wide KV) send a request's KV to decode
    TP=b's ranks; asserts every receiving rank holds its heads, byte for byte; returns the parts
    and, per part, the sending rank and the heads it read from its own pool."""
    config = TransportConfig(backend=backend, secret=SECRET, timeout_s=5.0, path=path)
    whole = whole_kv(kv_heads)
    src, dst = rank_heads(kv_heads, a), rank_heads(kv_heads, b)
    src_pools = [whole[..., h.start:h.stop, :].contiguous() for h in src]
    src_blocks = [3, 4, 9, 10, 11, 0]  # a fragmented request; the same ids on every rank
    reservers = [ListReserver(16) for _ in dst]
    receivers = [make_receiver(config, layout(len(h)).allocate(), layout(len(h)), r, first_head=h.start)
                 for h, r in zip(dst, reservers)]
    for rx in receivers:
        await rx.start()
    sender = make_sender(config)
    cut = parts(dst, [src])
    block_ids = list(range(5, 11))  # one reservation's blocks, shared by its parts on every rank
    leases = [receivers[p.rank].reserve(TOKENS, block_ids=block_ids, heads=p.heads) for p in cut]
    sent = []
    try:
        for part, lease, rank in zip(cut, leases, sending_ranks(src, [p.heads for p in cut])):
            transfer = await sender.start(lease, src_pools[rank], layout(len(src[rank])), src_blocks,
                                          first_head=src[rank].start)
            sent.append((rank, lease.src_heads(src[rank].start)))
            transfer.all_layers_ready()
            stats = await transfer.finish(5.0)
            assert stats.bytes == 2 * 2 * TOKENS * len(range(*part.heads)) * 8 * 4  # that part's heads only
            assert (stats.strategy, stats.runs) == ("contiguous", 3)  # one op per run, strided or not
            await receivers[part.rank].wait(lease.lease_id)
        want = read_tokens(whole, layout(kv_heads), src_blocks, TOKENS)
        for h, rx in zip(dst, receivers):
            got = read_tokens(rx.pool, rx.layout, block_ids, TOKENS)
            assert torch.equal(got, want[..., h.start:h.stop, :])
    finally:
        await sender.close()
        for rx in receivers:
            await rx.close()
    return cut, sent


@pytest.mark.parametrize("a,b", list(itertools.product(SIZES, SIZES)))
@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: TP=4 replicates each head on two ranks
async def test_every_receiving_rank_gets_its_heads_from_the_ranks_that_hold_them(kv_heads, a, b):
    cut, sent = await move(kv_heads, a, b, "local")
    src, dst = rank_heads(kv_heads, a), rank_heads(kv_heads, b)
    # every receiving rank's heads, exactly once each
    for rank, heads in enumerate(dst):
        got = sorted(h for p in cut if p.rank == rank for h in range(*p.heads))
        assert got == list(heads)
    # a part is never wider than the sending rank's heads, which it reads from its own pool
    for part, (rank, heads) in zip(cut, sent):
        assert set(range(*part.heads)) <= set(src[rank])
        assert heads == HeadSlice(part.heads[0] - src[rank].start, part.heads[1] - part.heads[0])
    # replicated heads: the ranks holding them send in turn
    holders_sent = {}
    for part, (rank, _) in zip(cut, sent):
        holders_sent.setdefault(part.heads, []).append(rank)
    for heads, ranks in holders_sent.items():
        holders = [r for r, held in enumerate(src) if heads[0] in held]
        assert ranks == [holders[i % len(holders)] for i in range(len(ranks))]
    if a == b:  # the same split: one part per rank, each rank to itself, whole pools
        assert [(p.rank, r) for p, (r, _) in zip(cut, sent)] == [(r, r) for r in range(b)]


@pytest.mark.parametrize("a,b", [(2, 1), (1, 2), (4, 2)])
async def test_head_slices_cross_tcp_with_the_receiver_checking_its_lease_heads(a, b):
    await move(4, a, b, "tcp")


@pytest.mark.parametrize("a,b", [(2, 1), (1, 2), (4, 2)])
@pytest.mark.parametrize("path", ["direct", "staged"])
async def test_head_slices_cross_ucx_each_strided_side_copying_its_runs(a, b, path):
    """direct: the side whose pool holds more heads than the part copies each run's strided slice
    through a buffer, the other side's pool is on the wire itself; staged: both through buffers."""
    await move(4, a, b, "ucx", path)


def test_head_slices_move_in_runs_like_whole_pools_each_side_knowing_whether_its_pool_is_whole():
    two, four = layout(2), layout(4)
    whole = build_plan(two, [0, 1], two, [2, 3], 8)
    assert (whole.strategy, whole.runs, whole.wire_token_bytes) == (Strategy.CONTIGUOUS, 1, 2 * 8 * 4)
    assert whole.whole("src") and whole.whole("dst")
    half = build_plan(four, [0, 1], two, [2, 3], 8, src_heads=HeadSlice(2, 2), dst_heads=HeadSlice(0, 2))
    assert (half.strategy, half.runs, half.ops_per_layer) == (Strategy.CONTIGUOUS, 1, 2)
    assert half.layer_bytes == 2 * 8 * 2 * 8 * 4 and not half.whole("src") and half.whole("dst")
    blocks = build_plan(four, [0, 1], two, [2, 3], 8, Strategy.BLOCKS, src_heads=HeadSlice(2, 2))
    assert (blocks.strategy, blocks.runs) == (Strategy.BLOCKS, 2)
    fragmented = build_plan(four, [0, 1], two, [3, 2], 8, gather_threshold=1, src_heads=HeadSlice(2, 2))
    assert fragmented.strategy is Strategy.GATHER  # past the threshold, as for whole pools
    with pytest.raises(ValueError, match="source heads 3..4 are not among the 4 KV heads"):
        build_plan(four, [0, 1], two, [2, 3], 8, src_heads=HeadSlice(3, 2))
    with pytest.raises(ValueError, match="differ in layers, kv_heads or head_dim"):
        build_plan(four, [0, 1], two, [2, 3], 8)


def test_a_part_cut_for_other_senders_says_which_heads_no_rank_holds():
    # decode TP=1 cut for senders of TP=2: heads 0-1 and 2-3; a TP=1 sender holds both in one rank,
    # a TP=4 sender holds no part whole
    cut = parts(rank_heads(4, 1), [rank_heads(4, 2)])
    assert cut == [Part(0, (0, 2)), Part(0, (2, 4))]
    assert sending_ranks(rank_heads(4, 1), [p.heads for p in cut]) == [0, 0]
    with pytest.raises(ValueError, match="no rank of this side holds KV heads 0..1 together"):
        sending_ranks(rank_heads(4, 4), [p.heads for p in cut])
