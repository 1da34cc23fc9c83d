"""Leases on a fake clock: reserve, write, commit; abort and expiry give blocks back."""
from __future__ import annotations

import pytest

from tests.support.clock import FakeClock
from transport.lease import LeaseError, LeaseState, LeaseTable
from transport.peer import ListReserver


@pytest.fixture
def table():
    reserver = ListReserver(16)
    clock = FakeClock(100.0)
    yield LeaseTable(reserver, block_size=4, clock=clock), reserver, clock
    assert sorted(reserver.free_ids) == list(range(16))


def test_commit_hands_the_blocks_over(table):
    leases, reserver, _ = table
    lease = leases.reserve(9, ttl_s=5)
    assert len(lease.block_ids) == 3 and len(reserver.free_ids) == 13
    leases.start_writing(lease.lease_id)
    ended = []
    lease.on_end.append(ended.append)
    assert leases.commit(lease.lease_id) == lease.block_ids
    assert ended == [lease.lease_id] and len(leases) == 0
    assert len(reserver.free_ids) == 13  # the blocks are the engine's now
    reserver.free(lease.block_ids)


def test_expiry_frees_and_ends(table):
    leases, reserver, clock = table
    a, b = leases.reserve(4, ttl_s=5), leases.reserve(4, ttl_s=50)
    ended = []
    a.on_end.append(ended.append)
    clock.now += 5
    assert leases.expire() == [a.lease_id] and ended == [a.lease_id]
    with pytest.raises(LeaseError, match="unknown, expired"):
        leases.start_writing(a.lease_id)
    assert leases.remaining_s(b.lease_id) == 45
    leases.abort_all()
    assert len(leases) == 0 and len(reserver.free_ids) == 16


def test_abort_is_idempotent(table):
    leases, _, _ = table
    lease = leases.reserve(1, ttl_s=5)
    assert leases.abort(lease.lease_id) is True
    assert leases.abort(lease.lease_id) is False


def test_one_writer_per_lease(table):
    leases, _, _ = table
    lease = leases.reserve(1, ttl_s=5)
    assert leases.start_writing(lease.lease_id).state is LeaseState.WRITING
    with pytest.raises(LeaseError, match="already being written"):
        leases.start_writing(lease.lease_id)
    leases.abort(lease.lease_id)
    leases.writer_done(lease.lease_id)


@pytest.mark.parametrize("end", ["abort", "expiry", "shutdown"])
def test_blocks_being_written_wait_for_the_writer(table, end):
    leases, reserver, clock = table
    lease = leases.reserve(8, ttl_s=5)
    leases.start_writing(lease.lease_id)
    ended = []
    lease.on_end.append(ended.append)
    if end == "abort":
        assert leases.abort(lease.lease_id)
    elif end == "expiry":
        clock.now += 5
        assert leases.expire() == [lease.lease_id]
    else:
        leases.abort_all()  # at shutdown every writer has stopped already
        assert len(reserver.free_ids) == 16
        return
    assert ended == [lease.lease_id] and len(leases) == 0  # ended for everyone at once...
    assert leases.draining == 1 and len(reserver.free_ids) == 14  # ...but a read may still land
    leases.writer_done(lease.lease_id)
    assert leases.draining == 0 and len(reserver.free_ids) == 16
    leases.writer_done(lease.lease_id)  # idempotent


@pytest.mark.parametrize("tokens, ttl", [(0, 5), (4, 0)])
def test_bad_reservations(table, tokens, ttl):
    with pytest.raises(LeaseError, match="positive"):
        table[0].reserve(tokens, ttl)


def test_no_room_leaves_nothing_reserved(table):
    leases, reserver, _ = table
    with pytest.raises(RuntimeError, match="17 blocks asked"):
        leases.reserve(68, ttl_s=5)
    assert len(leases) == 0 and len(reserver.free_ids) == 16
