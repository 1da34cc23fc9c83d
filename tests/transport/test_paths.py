"""Each side's path (transport/path.py): direct where its data plane reaches the pool's
memory, staged through host buffers where it does not or where the config says so.
The staged path runs here on CPU pools (path staged), between processes over loopback
UCX and TCP: byte-exact layer by layer, and pipelined (a layer is on the wire before the
last layer's staging has finished). The CUDA cases run where a GPU is."""
from __future__ import annotations

import threading

import pytest
import torch

from transport import LeaseDescriptor, TransferError, TransportConfig, make_receiver, make_sender
from transport.path import Path, choose, joined
from transport.peer import read_tokens
from transport.stream import HostStream
from transport.ucx_report import UcxResource, unreachable
from tests.transport.support import SECRET, filled, make_layout
from tests.transport.peer_side import Side, all_started, transfer

NO_CUDA = "needs a CUDA GPU (none here: torch.cuda.is_available() is False)"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)

# Runs of 100+ tokens are 25+ KiB per op: over UCX's eager limit, so rendezvous moves them.
LAYOUT = make_layout(block_size=16, num_blocks=128, kv_heads=4)
FP32_SMALL_BLOCKS = make_layout(block_size=4, num_blocks=512, kv_heads=4, dtype=torch.float32)
TOKENS = 300
HOST = (UcxResource("tcp", "lo"), UcxResource("cma", "memory"))
CUDA_COPY = UcxResource("cuda_copy", "cuda")


def test_auto_is_direct_where_the_data_plane_reaches_the_memory():
    assert choose("auto", "cpu", None) is Path.DIRECT
    assert choose("auto", "npu", unreachable(HOST, "npu")) is Path.STAGED
    assert choose("staged", "cpu", None) is Path.STAGED
    with pytest.raises(ValueError, match="path direct for a npu pool: UCX has no transport for npu "
                                         "memory; use path auto or staged"):
        choose("direct", "npu", unreachable(HOST, "npu"))


def test_a_transfer_is_direct_only_when_both_sides_are():
    assert joined("direct", "direct") is Path.DIRECT
    assert joined("direct", "staged") is joined("staged", "direct") is Path.STAGED


def test_ucx_reaches_cuda_memory_only_with_its_cuda_copy_transport():
    assert unreachable(HOST, "cpu") is None
    why = unreachable(HOST, "cuda")
    assert "no cuda_copy transport" in why and "it has cma, tcp" in why
    assert unreachable(HOST + (CUDA_COPY, UcxResource("cuda_ipc", "cuda")), "cuda") is None
    assert unreachable(HOST + (CUDA_COPY,), "npu") == "UCX has no transport for npu memory"


def test_what_the_data_planes_reach():
    from transport.backends.tcp import TcpPlane
    from transport.backends.ucx import UcxPlane

    assert TcpPlane().reaches("cpu") is None
    assert TcpPlane().reaches("cuda") == "the tcp data plane moves host memory only"
    ucx = UcxPlane()
    assert ucx.reaches("cpu") is None and ucx.reaches("npu")
    if not torch.cuda.is_available():  # this UCX loaded no CUDA transport: there is no GPU
        assert "no cuda_copy transport" in ucx.reaches("cuda")


async def test_path_direct_where_it_cannot_be_is_a_clear_error(reserver):
    # A pool on the meta device: memory that no data plane here reaches.
    meta = LAYOUT.allocate().to("meta")
    cfg = TransportConfig(backend="tcp", secret=SECRET, path="direct")
    with pytest.raises(ValueError, match="path direct for a meta pool: the tcp data plane moves "
                                         "host memory only; use path auto or staged"):
        make_receiver(cfg, meta, LAYOUT, reserver(LAYOUT))
    receiver = make_receiver(cfg, LAYOUT.allocate(), LAYOUT, reserver(LAYOUT))
    await receiver.start()
    sender = make_sender(cfg)
    lease = receiver.reserve(TOKENS)
    with pytest.raises(TransferError, match=r"\[plan\] path direct for a meta pool"):
        await sender.start(lease, meta, LAYOUT, list(range(LAYOUT.blocks_for(TOKENS))))
    assert len(receiver.leases) == 1  # refused before anything was sent: the lease stays
    receiver.abort(lease.lease_id)
    await sender.close()
    await receiver.close()


def test_host_stream_runs_work_in_order_off_the_caller():
    stream = HostStream()
    seen: list[tuple[int, str]] = []
    done = [stream.issue(lambda i=i: seen.append((i, threading.current_thread().name)))
            for i in range(5)]
    stream.drain()
    assert all(d.done() for d in done) and [i for i, _ in seen] == list(range(5))
    assert all(name.startswith("kv-copy") for _, name in seen)
    assert stream.issue(None) is None and stream.mark() is None
    stream.close()


@pytest.fixture(scope="module")
def peers():
    made = {"recv": Side("receiver", "ucx-shm", LAYOUT, path="staged"),
            "send": Side("sender", "ucx-shm", LAYOUT, seed=1, path="staged"),
            "send32": Side("sender", "ucx-shm", FP32_SMALL_BLOCKS, seed=2, path="staged"),
            "send_direct": Side("sender", "ucx-shm", LAYOUT, seed=3),
            "tcp_recv": Side("receiver", "tcp", LAYOUT, path="staged"),
            "tcp_send": Side("sender", "tcp", LAYOUT, seed=4, path="staged")}
    with all_started(made):
        yield made


@pytest.fixture
def clean(peers):
    """Every peer ends the test with its free lists in order, every block free, no lease."""
    yield peers
    for side in peers.values():
        side.call("order")
        side.assert_clean()


@pytest.mark.parametrize("fragmented, strategy, want", [
    (False, "contiguous", "contiguous"),
    (True, "contiguous", "contiguous"),
    (True, "blocks", "blocks"),
    (True, "gather", "gather"),
])
def test_staged_over_ucx_lands_every_layer(clean, fragmented, strategy, want):
    recv, send = clean["recv"], clean["send"]
    if fragmented:
        recv.call("order", seed=3)
        send.call("order", seed=4)
    sent, got = transfer(recv, send, TOKENS, strategy)
    assert sent["path"] == got["path"] == "staged"
    assert sent["strategy"] == got["strategy"] == want
    assert (sent["runs"] > 1) == (fragmented or strategy == "blocks")


def test_staged_converts_dtype_and_block_size(clean):
    clean["send32"].call("order", seed=5)
    sent, got = transfer(clean["recv"], clean["send32"], TOKENS)
    assert (sent["path"], sent["strategy"]) == (got["path"], got["strategy"]) == ("staged", "gather")


def test_one_staged_side_makes_the_transfer_staged(clean):
    sent, got = transfer(clean["recv"], clean["send_direct"], TOKENS)
    assert sent["path"] == got["path"] == "staged"


def test_staged_over_tcp(clean):
    clean["tcp_recv"].call("order", seed=6)
    sent, got = transfer(clean["tcp_recv"], clean["tcp_send"], TOKENS)
    assert sent["path"] == got["path"] == "staged"


async def test_a_layer_is_on_the_wire_before_the_last_layer_is_staged(clean, reserver):
    """Every layer is ready at once; the last layer's staging (on the copy stream) is held
    until layer 0 is on the wire. A sender that staged every layer before sending any would
    never put layer 0 on the wire: the hold times out and says so."""
    recv = clean["recv"]
    sender = make_sender(TransportConfig(backend="ucx", secret=SECRET, timeout_s=5.0, path="staged"))
    last = LAYOUT.num_layers - 1
    layer0_on_wire = threading.Event()
    steps: list[tuple] = []

    def hook(point: str, layer: int) -> None:
        if (point, layer) == ("wire", 0):
            layer0_on_wire.set()
        if (point, layer) == ("staged", last):
            steps.append(("held until layer 0 was on the wire", layer0_on_wire.wait(3)))
        steps.append((point, layer))

    sender.on_step = hook
    pool, res = filled(LAYOUT, 7), reserver(LAYOUT)
    ids = res.allocate(LAYOUT.blocks_for(TOKENS))
    lease = recv.call("reserve", num_tokens=TOKENS)
    recv.proc.submit("wait", lease_id=lease["lease_id"], timeout_s=10)
    stats = await sender.send(LeaseDescriptor.from_wire(lease), pool, LAYOUT, ids)
    got = recv.proc.result()
    assert ("held until layer 0 was on the wire", True) in steps
    assert steps.index(("wire", 0)) < steps.index(("staged", last))
    assert sorted(steps[i] for i in range(len(steps)) if steps[i][0] in ("staged", "wire")) == sorted(
        (p, layer) for p in ("staged", "wire") for layer in range(LAYOUT.num_layers))
    assert stats.path == got["stats"]["path"] == "staged"
    want = read_tokens(pool, LAYOUT, ids, TOKENS).float()
    landed = recv.kv(got["block_ids"], TOKENS)
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(landed[layer], want[layer]), f"layer {layer} differs"
    recv.call("free", block_ids=got["block_ids"])
    res.free(ids)
    await sender.close()


CUDA_LAYOUT = make_layout(block_size=16, num_blocks=128, kv_heads=4, device="cuda")


def _ucx_cuda_or_skip() -> None:
    from transport.backends.ucx import UcxPlane

    why = UcxPlane().reaches("cuda")
    if why:
        pytest.skip(f"UCX here cannot move CUDA memory: {why}")


@needs_cuda
@pytest.mark.parametrize("path, want", [("auto", "direct"), ("staged", "staged")])
@pytest.mark.parametrize("fragmented", [False, True])
def test_cuda_to_cuda_between_processes(path, want, fragmented):
    """Two processes on one GPU: direct is UCX on device memory (cuda_ipc), no host staging."""
    if want == "direct":
        _ucx_cuda_or_skip()
    recv = Side("receiver", "ucx", CUDA_LAYOUT, path=path)
    send = Side("sender", "ucx", CUDA_LAYOUT, seed=1, path=path)
    try:
        recv.started(), send.started()
        if fragmented:
            recv.call("order", seed=3)
            send.call("order", seed=4)
        for strategy in ("contiguous", "gather"):
            sent, got = transfer(recv, send, TOKENS, strategy)
            assert sent["path"] == got["path"] == want
        send.call("order")
        recv.call("order")
        send.assert_clean()
        recv.assert_clean()
    finally:
        recv.proc.close()
        send.proc.close()


@needs_cuda
def test_cuda_sender_into_a_host_pool_is_direct():
    _ucx_cuda_or_skip()
    recv = Side("receiver", "ucx", make_layout(block_size=4, num_blocks=512, kv_heads=4, dtype=torch.float32))
    send = Side("sender", "ucx", CUDA_LAYOUT, seed=1)
    try:
        recv.started(), send.started()
        sent, got = transfer(recv, send, TOKENS)
        assert sent["path"] == got["path"] == "direct" and sent["strategy"] == "gather"
    finally:
        recv.proc.close()
        send.proc.close()


@needs_cuda
def test_accelerator_stream_waits_for_the_compute_before_it():
    from transport.stream import AcceleratorStream
    import asyncio

    device = torch.device("cuda", torch.cuda.current_device())
    stream = AcceleratorStream(device)
    src = torch.zeros(1 << 24, device=device)
    dst = torch.empty(1 << 24, dtype=torch.float32, pin_memory=True)
    torch.cuda._sleep(10_000_000)  # compute still running when the mark is taken
    src.fill_(3.0)
    done = stream.issue(lambda: dst.copy_(src, non_blocking=True), stream.mark())
    asyncio.run(stream.wait(done))
    assert done.query() and bool((dst == 3.0).all())
