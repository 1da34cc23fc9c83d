"""The control messages between a KV sender and receiver: msgpack maps with a
version field, explicit schemas and size limits (never pickle), and the
shared-secret handshake that keeps peers without the mesh's token away from
registered memory.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import msgpack

# 2: ready carries the lease time left; no abort frame (a closed connection aborts)
# 3: begin and ready carry each side's path (direct or staged)
VERSION = 3
HEADER = struct.Struct("!I")
# Control messages are small; the largest is a begin with one id per block.
MAX_MESSAGE_BYTES = 1 << 20
NONCE_BYTES = 16

# type -> required fields and their Python types (after msgpack decoding)
SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "challenge": {"nonce": bytes},
    "hello": {"nonce": bytes, "mac": bytes},
    "welcome": {"mac": bytes},
    "begin": {"lease_id": str, "layout": dict, "block_ids": list, "num_tokens": int,
              "strategy": str, "gather_threshold": int, "address": bytes, "path": str},
    "ready": {"tag_base": int, "address": bytes, "remaining_s": float, "path": str},
    "layer": {"layer": int, "nbytes": int},
    "commit": {"nbytes": int},
    "committed": {},
    "error": {"code": str, "message": str},
}


class WireError(Exception):
    """A message is malformed, oversized, of another version or unexpected."""


def encode(kind: str, **fields) -> bytes:
    check(kind, fields)
    body = msgpack.packb({"v": VERSION, "t": kind, **fields}, use_bin_type=True)
    if len(body) > MAX_MESSAGE_BYTES:
        raise WireError(f"{kind} message of {len(body)} bytes is over the {MAX_MESSAGE_BYTES} limit")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (n,) = HEADER.unpack(header)
    if n > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {n} bytes is over the {MAX_MESSAGE_BYTES} limit")
    return n


def decode(body: bytes) -> dict:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True,
                              max_bin_len=MAX_MESSAGE_BYTES, max_str_len=MAX_MESSAGE_BYTES)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise WireError(f"malformed message: {e}") from None
    if not isinstance(msg, dict):
        raise WireError("malformed message: not a map")
    if msg.get("v") != VERSION:
        raise WireError(f"wire version {msg.get('v')!r}, expected {VERSION}")
    kind = msg.get("t")
    if kind not in SCHEMAS:
        raise WireError(f"unknown message type {kind!r}")
    fields = {k: v for k, v in msg.items() if k not in ("v", "t")}
    check(kind, fields)
    return {"t": kind, **fields}


def check(kind: str, fields: dict) -> None:
    for name, typ in SCHEMAS[kind].items():
        value = fields.get(name)
        # bool is an int subclass: a flag is never a count
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise WireError(f"{kind}.{name} must be {getattr(typ, '__name__', typ)}")
    if kind == "begin" and not all(
            isinstance(b, int) and not isinstance(b, bool) for b in fields["block_ids"]):
        raise WireError("begin.block_ids must be ints")


def mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    """HMAC of a peer's nonce: proves the secret without sending it."""
    return hmac.new(secret, b"pdmesh-kv/1|" + role + b"|" + nonce, hashlib.sha256).digest()


def verify(secret: bytes, role: bytes, nonce: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(mac(secret, role, nonce), tag)
