"""Leases in parts across a decode actor's tensor-parallel ranks (mesh.kv.rank_receivers), on the
in-process transport: a reservation commits once every part did; a part that fails ends the
others; either way the reservation's blocks go back to the engine exactly once (the reserver
refuses a double free), and only after every part ended."""
from __future__ import annotations

import pytest
import torch

from mesh.kv.rank_receivers import RankReceivers, SharedBlocks
from transport import TransferError, TransportConfig, make_receiver, make_sender
from transport.layout import KVLayout
from transport.peer import ListReserver, read_tokens

HEADS = [range(0, 1), range(1, 2)]  # a TP=2 decode actor of a 2-KV-head model
LAYOUT = KVLayout(2, 8, 4, 1, 8, torch.float32)
WHOLE = KVLayout(2, 8, 4, 2, 8, torch.float32)  # a TP=1 sender's pool


@pytest.fixture
async def ranks():
    engine = ListReserver(8)
    blocks = SharedBlocks(engine)
    config = TransportConfig(backend="local")
    receivers = [make_receiver(config, LAYOUT.allocate(), LAYOUT, blocks, first_head=h.start) for h in HEADS]
    rx = RankReceivers(receivers, HEADS, blocks)
    yield rx, engine
    await rx.close()
    assert sorted(engine.free_ids) == list(range(8)), "KV blocks leaked"


async def test_a_reservation_commits_once_every_part_did(ranks):
    rx, engine = ranks
    ids = engine.allocate(2)
    parts = rx.reserve(6, ids, [HEADS])
    assert [p.heads for p in parts] == [(0, 1), (1, 2)] and len(rx) == 2
    sender = make_sender(TransportConfig(backend="local"))
    pool = WHOLE.allocate()
    pool.normal_()
    for part in parts:
        await sender.send(part, pool, WHOLE, [0, 1])
    got = await rx.wait(parts[0].lease_id)
    assert got.block_ids == ids and got.stats.bytes == 2 * 2 * 6 * 2 * 8 * 4 and len(rx) == 0
    want = read_tokens(pool, WHOLE, [0, 1], 6)
    for rank, heads in enumerate(HEADS):  # each rank's pool got its own head
        got_kv = read_tokens(rx.receivers[rank].pool, LAYOUT, ids, 6)
        assert torch.equal(got_kv, want[..., heads.start:heads.stop, :])
    engine.free(got.block_ids)  # the caller's now


async def test_a_failed_part_ends_the_others_and_the_blocks_go_back_once(ranks):
    rx, engine = ranks
    ids = engine.allocate(2)
    parts = rx.reserve(6, ids, [HEADS])
    sender = make_sender(TransportConfig(backend="local"))
    pool = WHOLE.allocate()
    await sender.send(parts[1], pool, WHOLE, [0, 1])  # one part commits
    assert len(engine.free_ids) == 6  # still held: a part is open
    assert rx.abort(parts[0].lease_id)  # the reservation is given up
    with pytest.raises(TransferError, match="ended without a commit"):
        await rx.wait(parts[0].lease_id)
    assert sorted(engine.free_ids) == list(range(8)) and len(rx) == 0


async def test_a_part_that_cannot_be_reserved_leaves_the_blocks_to_the_caller(ranks):
    rx, engine = ranks
    ids = engine.allocate(2)
    with pytest.raises(Exception, match="blocks given for"):
        rx.reserve(100, ids, [HEADS])  # 100 tokens need 25 blocks of 4: the lease table says no
    assert len(rx) == 0 and len(engine.free_ids) == 6  # nothing freed behind the caller's back
    engine.free(ids)
