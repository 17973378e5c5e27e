"""The bus envelope: one msgpack frame holding a map {v, type, src, dst, cid, body}.

`cid` 0 means one-way (no reply expected); a request carries a cid > 0 that its reply echoes.
Types starting with "_" belong to the protocol (see PROTOCOL_TYPES); any other type is an
application message the broker forwards to the actor named by `dst`, adding one key, `role`: the
role the sender registered with (`stamp_role`). A client cannot set it: `decode` refuses any key
but the six, so a receiver can trust `role` (and `src`, which the broker checks) to decide whom it serves.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import msgpack

from bus.errors import ProtocolError

SCHEMA_VERSION = 1
BROKER = ""  # dst of messages addressed to the broker itself, src of messages it originates

# Protocol types. Client -> broker (dst == BROKER):
REGISTER, HEARTBEAT, BYE, SUBSCRIBE, UNSUBSCRIBE, ACTORS = "_reg", "_hb", "_bye", "_sub", "_unsub", "_actors"
# Broker -> client, or actor -> actor through the broker:
REPLY, ERROR, HEARTBEAT_ACK, PUBLISH = "_reply", "_error", "_hback", "_pub"
BROKER_TYPES = frozenset({REGISTER, HEARTBEAT, BYE, SUBSCRIBE, UNSUBSCRIBE, ACTORS})
PROTOCOL_TYPES = BROKER_TYPES | {REPLY, ERROR, HEARTBEAT_ACK, PUBLISH}

_KEYS = frozenset({"v", "type", "src", "dst", "cid", "body"})
MAX_NAME = 256  # bytes of type / src / dst strings
MAX_CID = 2**63 - 1


@dataclass(slots=True)
class Envelope:
    type: str
    src: str
    dst: str
    cid: int
    body: Any
    v: int = SCHEMA_VERSION
    role: str | None = None  # the sender's registered role, stamped by the broker on application messages


class Codec:
    """Encoder that reuses one msgpack Packer (a fresh Packer allocates a large buffer)."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)

    def pack(self, type: str, src: str, dst: str, cid: int, body: Any) -> bytes:
        try:
            return self._packer.pack(
                {"v": SCHEMA_VERSION, "type": type, "src": src, "dst": dst, "cid": cid, "body": body}
            )
        except (TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"body of {type!r} for {dst!r} is not msgpack-serialisable: {e}") from None

    def encode(self, env: Envelope) -> bytes:
        if env.v != SCHEMA_VERSION:
            raise ProtocolError(f"cannot encode schema version {env.v!r}, this bus speaks {SCHEMA_VERSION}")
        return self.pack(env.type, env.src, env.dst, env.cid, env.body)


_local = threading.local()


def encode(env: Envelope) -> bytes:
    codec = getattr(_local, "codec", None)
    if codec is None:
        codec = _local.codec = Codec()
    return codec.encode(env)


def decode(frame: bytes) -> Envelope:
    """Parse and validate one frame; any defect raises ProtocolError naming it."""
    try:
        m = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"not msgpack ({type(e).__name__}: {e})"[:200]) from None
    if not isinstance(m, dict):
        raise ProtocolError(f"envelope is a {type(m).__name__}, expected a map")
    if m.keys() != _KEYS:
        keys = set(m.keys())
        missing, extra = sorted(_KEYS - keys), sorted(map(repr, keys - _KEYS))[:5]
        raise ProtocolError(f"envelope keys wrong: missing {missing}, unexpected {extra}")
    v, type_, src, dst, cid = m["v"], m["type"], m["src"], m["dst"], m["cid"]
    if v != SCHEMA_VERSION or type(v) is not int:
        raise ProtocolError(f"schema version {v!r:.40}, this bus speaks {SCHEMA_VERSION}")
    if type(type_) is not str or not type_ or len(type_) > MAX_NAME:
        raise ProtocolError(f"type must be a non-empty string of <= {MAX_NAME} chars, got {type_!r:.80}")
    if type(src) is not str or len(src) > MAX_NAME:
        raise ProtocolError(f"src must be a string of <= {MAX_NAME} chars, got {src!r:.80}")
    if type(dst) is not str or len(dst) > MAX_NAME:
        raise ProtocolError(f"dst must be a string of <= {MAX_NAME} chars, got {dst!r:.80}")
    if type(cid) is not int or not 0 <= cid <= MAX_CID:
        raise ProtocolError(f"cid must be an integer in [0, 2**63), got {cid!r:.40}")
    return Envelope(type_, src, dst, cid, m["body"], v)


# A frame `decode` accepted is a map of six keys, so its header is one of these (fixmap, map16, map32);
# the stamped frame has the same kind of header counting seven.
_HEADERS = {0x86: (b"\x86", b"\x87"), 0xDE: (b"\xde\x00\x06", b"\xde\x00\x07"),
            0xDF: (b"\xdf\x00\x00\x00\x06", b"\xdf\x00\x00\x00\x07")}


@functools.lru_cache(maxsize=256)
def _role_entry(role: str) -> bytes:
    return msgpack.packb("role") + msgpack.packb(role)


def stamp_role(frame, env: Envelope, role: str) -> bytes:
    """`frame` (which `decode` turned into `env`) with the key `role` added.

    Appending one map entry costs a copy, not a re-encode; a map with repeated keys (valid msgpack,
    another header count) is packed afresh."""
    buf = memoryview(frame)
    six, seven = _HEADERS.get(buf[0], (None, None)) if len(buf) else (None, None)
    if six is not None and buf[:len(six)] == six:
        return b"".join((seven, buf[len(six):], _role_entry(role)))
    return msgpack.packb({"v": env.v, "type": env.type, "src": env.src, "dst": env.dst, "cid": env.cid,
                          "body": env.body, "role": role}, use_bin_type=True)


def decode_trusted(frame: bytes) -> Envelope:
    """Decode a frame the broker has already validated (clients use this; the broker never does)."""
    try:
        m = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        return Envelope(m["type"], m["src"], m["dst"], m["cid"], m["body"], m["v"], m.get("role"))
    except Exception as e:
        raise ProtocolError(f"undecodable frame from the broker ({type(e).__name__}: {e})"[:200]) from None
