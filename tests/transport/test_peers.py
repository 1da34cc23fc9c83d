"""Real transfers between processes: UCX over shared memory, UCX over TCP
(``UCX_TLS=tcp``) and the TCP backend. Byte-exact KV for contiguous and
fragmented pools, different block sizes and dtypes on each side; peers that
die mid-transfer; leases that expire mid-transfer. Every test ends with both
sides usable and no block or lease left behind."""
from __future__ import annotations

import pytest
import torch

from transport.peer import PeerError
from tests.transport.support import make_layout
from tests.transport.peer_side import Side, all_started
from tests.transport.peer_side import transfer as transfer_checked

# Runs of 100+ tokens are 25+ KiB per op: over UCX's eager limit, so rendezvous moves them.
RECV = make_layout(block_size=16, num_blocks=128, kv_heads=4)
SEND = make_layout(block_size=16, num_blocks=128, kv_heads=4)
SEND_FP32_SMALL_BLOCKS = make_layout(block_size=4, num_blocks=512, kv_heads=4, dtype=torch.float32)
TOKENS = 300


@pytest.fixture(scope="module", params=["ucx-shm", "ucx-tcp", "tcp"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def sides(kind):
    made = {"recv": Side("receiver", kind, RECV), "send": Side("sender", kind, SEND, seed=1),
            "send32": Side("sender", kind, SEND_FP32_SMALL_BLOCKS, seed=2),
            "doomed_send": Side("sender", kind, SEND, seed=1), "doomed_recv": Side("receiver", kind, RECV)}
    with all_started(made):
        yield made


@pytest.fixture
def recv(sides):
    yield sides["recv"]
    sides["recv"].call("order")
    sides["recv"].assert_clean()


def transfer(recv: Side, send: Side, strategy: str = "contiguous") -> dict:
    """A whole transfer that must succeed, checked byte for byte; returns the sender's stats."""
    sent, got = transfer_checked(recv, send, TOKENS, strategy)
    assert sent["path"] == got["path"] == "direct"  # host memory: the data plane moves the pools' own
    return sent


@pytest.mark.parametrize("fragmented, strategy, want", [
    (False, "contiguous", "contiguous"),
    (False, "blocks", "blocks"),
    (True, "contiguous", "contiguous"),
    (True, "blocks", "blocks"),
    (True, "gather", "gather"),
])
def test_byte_exact(sides, recv, fragmented, strategy, want):
    seeds = (3, 4) if fragmented else (None, None)
    recv.call("order", seed=seeds[0])
    sides["send"].call("order", seed=seeds[1])
    stats = transfer(recv, sides["send"], strategy)
    sides["send"].call("order")
    assert stats["strategy"] == want
    assert (stats["runs"] > 1) == (fragmented or strategy == "blocks")


def test_fp32_small_blocks_to_bf16_large_blocks(sides, recv):
    sides["send32"].call("order", seed=5)
    stats = transfer(recv, sides["send32"])
    sides["send32"].call("order")
    assert stats["strategy"] == "gather"


def test_lease_expiry_mid_transfer(sides, recv):
    send = sides["send"]
    lease = recv.call("reserve", num_tokens=TOKENS, ttl_s=30)
    send.call("start", lease=lease, layers=1)
    assert recv.call("advance", seconds=30)["expired"] == [lease["lease_id"]]
    with pytest.raises(PeerError) as err:
        send.call("finish")
    # the connection closes, or (when the stop raced the last bytes in) the receiver says why
    assert err.value.code in ("peer", "lease"), err.value
    send.assert_clean()
    recv.assert_clean()
    transfer(recv, send)


def test_receiver_abort_before_the_sender_starts(sides, recv):
    lease = recv.call("reserve", num_tokens=TOKENS)
    assert recv.call("abort", lease_id=lease["lease_id"]) == {"aborted": True}
    with pytest.raises(PeerError, match="unknown, expired or already ended") as err:
        sides["send"].call("send", lease=lease)
    assert err.value.code == "lease"
    transfer(recv, sides["send"])


def test_sender_that_dies_mid_transfer(sides, recv):
    doomed = sides["doomed_send"]
    lease = recv.call("reserve", num_tokens=TOKENS)
    recv.proc.submit("wait", lease_id=lease["lease_id"], timeout_s=10)
    doomed.call("start", lease=lease, layers=2)
    doomed.proc.submit("die")
    doomed.proc.proc.wait()
    with pytest.raises(PeerError, match="lease ended without a commit"):
        recv.proc.result()
    recv.assert_clean()
    transfer(recv, sides["send"])


def test_receiver_that_dies_mid_transfer(sides, recv):
    doomed = sides["doomed_recv"]
    send = sides["send"]
    lease = doomed.call("reserve", num_tokens=TOKENS)
    # Connected and agreed, no layer sent yet. (Over shared memory UCX aborts a
    # process whose copy hits a peer that just died: a sender mid-write would go
    # down with its receiver, by design; see load_ucxx.)
    send.call("start", lease=lease, layers=0)
    doomed.proc.submit("die")
    doomed.proc.proc.wait()
    with pytest.raises(PeerError) as err:
        send.call("finish")
    assert err.value.code == "peer"
    send.assert_clean()
    transfer(recv, send)
