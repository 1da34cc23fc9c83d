"""The in-process backend: the same plans and leases as the networked ones, without
a network; every case ends with every block free again."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from transport import TransferError, TransferState, TransportConfig, make_receiver, make_sender
from tests.support.clock import FakeClock
from tests.transport.support import assert_same_kv, filled, make_layout


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


async def pair(reserver, src_layout, dst_layout, src_seed=None, dst_seed=None, clock=None):
    cfg = TransportConfig(backend="local", gather_threshold=8)
    src_pool, dst_pool = filled(src_layout, 1), dst_layout.allocate()
    src_res, dst_res = reserver(src_layout, src_seed), reserver(dst_layout, dst_seed)
    receiver = make_receiver(cfg, dst_pool, dst_layout, dst_res, **({"clock": clock} if clock else {}))
    await receiver.start()
    return make_sender(cfg), receiver, (src_pool, src_res), (dst_pool, dst_res)


@pytest.mark.parametrize("src, dst, frag, strategy, want", [
    ({}, {}, False, "contiguous", "contiguous"),
    ({}, {}, True, "contiguous", "gather"),
    ({}, {}, True, "blocks", "blocks"),
    ({"block_size": 4}, {"block_size": 16, "num_blocks": 16}, False, "contiguous", "contiguous"),
    ({"block_size": 4}, {"block_size": 16, "num_blocks": 16}, True, "contiguous", "gather"),
    ({"dtype": torch.float32}, {}, False, "contiguous", "gather"),
    ({}, {"dtype": torch.float32}, True, "contiguous", "gather"),
    # Across devices (run where a GPU is): any strategy, the bytes must match.
    pytest.param({"device": "cuda"}, {}, False, "contiguous", None, marks=CUDA),
    pytest.param({}, {"device": "cuda"}, True, "contiguous", None, marks=CUDA),
    pytest.param({"device": "cuda", "block_size": 4}, {"dtype": torch.float32}, True, "contiguous", None,
                 marks=CUDA),
])
async def test_byte_exact(reserver, src, dst, frag, strategy, want):
    src_l, dst_l = make_layout(**src), make_layout(**dst)
    sender, receiver, (sp, sr), (dp, dr) = await pair(reserver, src_l, dst_l,
                                                      *((3, 4) if frag else (None, None)))
    tokens = 100
    lease = receiver.reserve(tokens)
    ids = sr.allocate(src_l.blocks_for(tokens))
    stats = await sender.send(lease, sp, src_l, ids, strategy)
    got = await receiver.wait(lease.lease_id)
    assert want in (None, stats.strategy) and got.stats == stats
    assert stats.bytes == src_l.num_layers * 2 * tokens * dst_l.token_bytes
    assert_same_kv(sp, src_l, ids, dp, dst_l, got.block_ids, tokens)
    sr.free(ids)
    dr.free(got.block_ids)
    await receiver.close()


async def test_layer_by_layer(reserver):
    lay = make_layout()
    sender, receiver, (sp, sr), (dp, dr) = await pair(reserver, lay, lay)
    lease = receiver.reserve(20)
    ids = sr.allocate(3)
    transfer = await sender.start(lease, sp, lay, ids)
    assert transfer.state is TransferState.WAITING
    for layer in (2, 0, 1):
        transfer.layer_ready(layer)
    assert transfer.state is TransferState.TRANSFERRING
    with pytest.raises(TransferError, match="finish before every layer"):
        await transfer.finish()
    with pytest.raises(ValueError, match="already sent"):
        transfer.layer_ready(0)
    transfer.layer_ready(3)
    await transfer.finish()
    got = await receiver.wait(lease.lease_id)
    assert transfer.state is TransferState.DONE
    assert_same_kv(sp, lay, ids, dp, lay, got.block_ids, 20)
    sr.free(ids)
    dr.free(got.block_ids)


@pytest.mark.parametrize("end", ["receiver abort", "expiry", "sender abort"])
async def test_lease_ends_mid_transfer(reserver, end):
    lay, clock = make_layout(), FakeClock()
    sender, receiver, (sp, sr), (dp, dr) = await pair(reserver, lay, lay, clock=clock)
    lease = receiver.reserve(20, ttl_s=5)
    ids = sr.allocate(3)
    transfer = await sender.start(lease, sp, lay, ids)
    transfer.layer_ready(0)
    if end == "receiver abort":
        assert receiver.abort(lease.lease_id)
    elif end == "expiry":
        clock.now = 5
        assert receiver.expire() == [lease.lease_id]
    else:
        await transfer.abort()
    transfer.layer_ready(1)  # the engine may still report layers: they are dropped
    assert transfer.state is TransferState.FAILED
    with pytest.raises(TransferError, match=r"\[lease\]"):
        await receiver.wait(lease.lease_id)
    assert len(dr.free_ids) == lay.num_blocks and len(receiver.leases) == 0
    sr.free(ids)


async def test_unknown_and_foreign_leases(reserver):
    lay = make_layout()
    sender, receiver, (sp, sr), _ = await pair(reserver, lay, lay)
    lease = receiver.reserve(8)
    receiver.abort(lease.lease_id)
    with pytest.raises(TransferError, match="unknown, expired or already ended"):
        await sender.start(lease, sp, lay, [0])
    with pytest.raises(TransferError, match="ended without a commit"):
        await receiver.wait(lease.lease_id)
    with pytest.raises(TransferError, match="unknown lease"):
        await receiver.wait(lease.lease_id)
    other = make_layout(num_layers=2)
    lease = receiver.reserve(8)
    with pytest.raises(TransferError, match=r"\[plan\].*layers"):
        await sender.start(lease, other.allocate(), other, [0])
    with pytest.raises(TransferError, match=r"\[plan\] pool .* does not match"):
        await sender.start(lease, sp[:2], lay, [0])
    with pytest.raises(TransferError, match="lease is for tcp, sender is local"):
        await sender.start(dataclasses.replace(lease, backend="tcp"), sp, lay, [0])
    receiver.abort(lease.lease_id)
    await receiver.close()
    with pytest.raises(TransferError, match="no local receiver"):
        await sender.start(dataclasses.replace(lease, port=-1), sp, lay, [0])
