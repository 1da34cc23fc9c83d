"""The msgpack wire format: schemas, size limits, version, and the handshake MACs."""
from __future__ import annotations

import msgpack
import pytest

from transport import wire
from transport.wire import WireError


def body(frame: bytes) -> bytes:
    assert wire.frame_length(frame[:wire.HEADER.size]) == len(frame) - wire.HEADER.size
    return frame[wire.HEADER.size:]


def test_round_trip():
    frame = wire.encode("layer", layer=3, nbytes=4096)
    assert wire.decode(body(frame)) == {"t": "layer", "layer": 3, "nbytes": 4096}


@pytest.mark.parametrize("raw, message", [
    (b"\xc1", "malformed"),
    (msgpack.packb([1, 2]), "not a map"),
    (msgpack.packb({"v": 1, "t": "commit", "nbytes": 1}), "wire version 1, expected 3"),
    (msgpack.packb({"t": "commit", "nbytes": 1}), "wire version None"),
    (msgpack.packb({"v": wire.VERSION, "t": "pickle", "nbytes": 1}), "unknown message type"),
    (msgpack.packb({"v": wire.VERSION, "t": "commit"}), "commit.nbytes must be int"),
    (msgpack.packb({"v": wire.VERSION, "t": "commit", "nbytes": "1"}), "commit.nbytes must be int"),
    (msgpack.packb({"v": wire.VERSION, "t": "commit", "nbytes": True}), "commit.nbytes must be int"),
    (msgpack.packb({"v": wire.VERSION, "t": "hello", "nonce": "text", "mac": b""}, use_bin_type=True),
     "hello.nonce must be bytes"),
])
def test_bad_messages_are_refused(raw, message):
    with pytest.raises(WireError, match=message):
        wire.decode(raw)


def test_block_ids_must_be_ints():
    fields = {"lease_id": "x", "layout": {}, "num_tokens": 1, "strategy": "contiguous",
              "gather_threshold": 1, "address": b"", "path": "direct"}
    with pytest.raises(WireError, match="block_ids must be ints"):
        wire.encode("begin", block_ids=[1, "2"], **fields)
    with pytest.raises(WireError, match="block_ids must be ints"):
        wire.encode("begin", block_ids=[1, False], **fields)


def test_size_limits_both_ways():
    with pytest.raises(WireError, match="over the"):
        wire.frame_length(wire.HEADER.pack(wire.MAX_MESSAGE_BYTES + 1))
    with pytest.raises(WireError, match="over the"):
        wire.encode("error", code="wire", message="x" * wire.MAX_MESSAGE_BYTES)


def test_macs_bind_secret_role_and_nonce():
    tag = wire.mac(b"s" * 16, b"sender", b"n" * 16)
    assert wire.verify(b"s" * 16, b"sender", b"n" * 16, tag)
    assert not wire.verify(b"t" * 16, b"sender", b"n" * 16, tag)
    assert not wire.verify(b"s" * 16, b"receiver", b"n" * 16, tag)
    assert not wire.verify(b"s" * 16, b"sender", b"m" * 16, tag)
