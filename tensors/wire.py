"""Wire format: one msgpack header (names, dtypes, shapes, byte sizes) plus one raw buffer per tensor.

`encode` returns memoryviews of the tensors' own memory and `decode` builds tensors on top of the
given buffers, so neither copies payload bytes (a CPU, contiguous tensor is required for that;
other tensors are made so once).  Decoded tensors share memory with the buffers: keep the buffers
unmodified while the tensors are in use.  Header layout:

    {"v": 1, "kind": "batch" | "tensors", "meta": {...}, "seq_meta": [per-sequence meta keys],
     "tensors": [{"name", "role", "dtype", "shape", "nbytes"[, "crc32"]}, ...]}

`role` is "cu_seqlens", "token" or "seq" for a PackedBatch and "tensor" for named tensors.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import msgpack
import torch

from tensors.errors import BatchError, WireError
from tensors.packed import PackedBatch

WIRE_VERSION = 1
Payload = Union[PackedBatch, dict[str, torch.Tensor]]
Buffer = Union[bytes, bytearray, memoryview, torch.Tensor, Any]  # anything exposing the buffer protocol

_DTYPE_NAMES = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2",
]  # fmt: skip
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)}
_DTYPE_TO_NAME = {dt: n for n, dt in DTYPES.items()}
_ROLES = {"batch": ("cu_seqlens", "token", "seq"), "tensors": ("tensor",)}


@dataclass(frozen=True)
class Entry:
    name: str
    role: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    crc32: int | None = None


@dataclass(frozen=True)
class Header:
    kind: str
    entries: tuple[Entry, ...]
    meta: dict[str, Any]
    seq_meta: frozenset[str] = frozenset()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


# ---- encode ----------------------------------------------------------------------------------


def tensor_buffer(t: torch.Tensor, name: str = "tensor") -> memoryview:
    """The tensor's bytes as a flat memoryview without copying (copies only if not CPU/contiguous)."""
    if t.dtype not in _DTYPE_TO_NAME:
        raise WireError(name, f"dtype {t.dtype} is not supported on the wire")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _named_entries(payload: Payload) -> tuple[str, list[tuple[str, str, torch.Tensor]], dict, list[str]]:
    if isinstance(payload, PackedBatch):
        items = [("cu_seqlens", "cu_seqlens", payload.cu_seqlens)]
        items += [(k, "token", v) for k, v in payload.tokens.items()]
        items += [(k, "seq", v) for k, v in payload.seqs.items()]
        return "batch", items, payload.meta, sorted(payload.seq_meta)
    if isinstance(payload, Mapping):
        items = []
        for k, v in payload.items():
            if not isinstance(k, str):
                raise WireError(str(k), "tensor names must be strings")
            if not isinstance(v, torch.Tensor):
                raise WireError(k, f"expected a torch.Tensor, got {type(v).__name__}")
            items.append((k, "tensor", v))
        return "tensors", items, {}, []
    raise WireError("payload", f"expected a PackedBatch or a dict of tensors, got {type(payload).__name__}")


def encode(payload: Payload, *, checksum: bool = False) -> tuple[bytes, list[memoryview]]:
    """(header, buffers) for a PackedBatch or a dict of named tensors; `checksum` adds a crc32 per buffer."""
    kind, items, meta, seq_meta = _named_entries(payload)
    buffers = [tensor_buffer(t, name) for name, _, t in items]
    crcs = [zlib.crc32(b) for b in buffers] if checksum else None
    return _pack_header(kind, items, meta, seq_meta, [b.nbytes for b in buffers], crcs), buffers


def encode_tensors(payload: Payload) -> tuple[bytes, list[torch.Tensor]]:
    """(header, tensors) without touching the bytes: for channels that move them themselves (GPU)."""
    kind, items, meta, seq_meta = _named_entries(payload)
    for name, _, t in items:
        if t.dtype not in _DTYPE_TO_NAME:
            raise WireError(name, f"dtype {t.dtype} is not supported on the wire")
    tensors = [t.detach().contiguous() for _, _, t in items]
    sizes = [t.numel() * t.element_size() for t in tensors]
    return _pack_header(kind, items, meta, seq_meta, sizes, None), tensors


def _pack_header(
    kind: str, items: list, meta: dict, seq_meta: list[str], sizes: list[int], crcs: list[int] | None
) -> bytes:
    descs = []
    for i, ((name, role, t), n) in enumerate(zip(items, sizes)):
        desc = {"name": name, "role": role, "dtype": _DTYPE_TO_NAME[t.dtype], "shape": list(t.shape), "nbytes": n}
        if crcs is not None:
            desc["crc32"] = crcs[i]
        descs.append(desc)
    try:
        raw = {"v": WIRE_VERSION, "kind": kind, "meta": meta, "seq_meta": seq_meta, "tensors": descs}
        return msgpack.packb(raw, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError("meta", f"is not msgpack-serialisable: {e}") from e


# ---- decode ----------------------------------------------------------------------------------


def parse_header(header: bytes | memoryview | Header) -> Header:
    """Parse and check a header; every inconsistency raises WireError naming the field."""
    if isinstance(header, Header):
        return header
    try:
        raw = msgpack.unpackb(header, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise WireError("header", f"is not valid msgpack: {e}") from e
    if not isinstance(raw, dict):
        raise WireError("header", f"must be a map, got {type(raw).__name__}")
    if raw.get("v") != WIRE_VERSION:
        raise WireError("v", f"unsupported wire version {raw.get('v')!r} (this side speaks {WIRE_VERSION})")
    kind = raw.get("kind")
    if kind not in _ROLES:
        raise WireError("kind", f"unknown payload kind {kind!r}")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError("meta", f"must be a map, got {type(meta).__name__}")
    seq_meta = raw.get("seq_meta", [])
    if not isinstance(seq_meta, list) or not all(isinstance(k, str) and k in meta for k in seq_meta):
        raise WireError("seq_meta", f"must list keys of meta, got {seq_meta!r}")
    descs = raw.get("tensors")
    if not isinstance(descs, list):
        raise WireError("tensors", "must be a list of tensor descriptions")
    entries, seen = [], set()
    for i, d in enumerate(descs):
        entries.append(_parse_entry(d, i, kind))
        if entries[-1].name in seen:
            raise WireError(entries[-1].name, "appears twice in the header")
        seen.add(entries[-1].name)
    if kind == "batch" and [e.role for e in entries].count("cu_seqlens") != 1:
        raise WireError("cu_seqlens", "a batch header needs exactly one cu_seqlens entry")
    return Header(kind, tuple(entries), meta, frozenset(seq_meta))


def _parse_entry(d: Any, i: int, kind: str) -> Entry:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise WireError(f"tensors[{i}]", "must be a map with a string 'name'")
    name = d["name"]
    if d.get("role") not in _ROLES[kind]:
        raise WireError(name, f"role {d.get('role')!r} is not one of {_ROLES[kind]}")
    dtype = DTYPES.get(d.get("dtype"))
    if dtype is None:
        raise WireError(name, f"unknown dtype {d.get('dtype')!r}")
    shape = d.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise WireError(name, f"shape {shape!r} must be a list of non-negative integers")
    nbytes = d.get("nbytes")
    expected = math.prod(shape) * dtype.itemsize
    if not isinstance(nbytes, int) or nbytes != expected:
        raise WireError(name, f"header says {nbytes!r} bytes but shape {shape} of {dtype} needs {expected}")
    crc = d.get("crc32")
    if crc is not None and not isinstance(crc, int):
        raise WireError(name, f"crc32 {crc!r} must be an integer")
    return Entry(name, d["role"], dtype, tuple(shape), nbytes, crc)


def buffer_nbytes(buf: Buffer) -> int:
    if isinstance(buf, torch.Tensor):
        return buf.numel() * buf.element_size()
    return memoryview(buf).nbytes


def _tensor_from(buf: Buffer, e: Entry) -> torch.Tensor:
    if e.nbytes == 0:
        return torch.empty(e.shape, dtype=e.dtype)
    if isinstance(buf, torch.Tensor):
        flat = buf.reshape(-1).view(torch.uint8)
        try:
            return flat.view(e.dtype).reshape(e.shape)
        except RuntimeError:  # misaligned offset for a wider dtype: copy once
            return flat.clone().view(e.dtype).reshape(e.shape)
    with warnings.catch_warnings():  # read-only buffers (bytes, zmq frames) are fine: we never write them
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)


def decode(header: bytes | memoryview | Header, buffers: Sequence[Buffer]) -> Payload:
    """Rebuild the payload on top of `buffers` (no copy).  Raises WireError naming the bad field."""
    h = parse_header(header)
    if len(buffers) != len(h.entries):
        raise WireError("tensors", f"header describes {len(h.entries)} tensors but {len(buffers)} buffers came")
    tensors: list[torch.Tensor] = []
    for e, buf in zip(h.entries, buffers):
        got = buffer_nbytes(buf)
        if got != e.nbytes:
            raise WireError(e.name, f"buffer has {got} bytes but the header says {e.nbytes}")
        if e.crc32 is not None:
            data = buf.reshape(-1).view(torch.uint8).numpy() if isinstance(buf, torch.Tensor) else buf
            if zlib.crc32(data) != e.crc32:
                raise WireError(e.name, "checksum mismatch: the buffer was corrupted in transit")
        tensors.append(_tensor_from(buf, e))
    if h.kind == "tensors":
        return {e.name: t for e, t in zip(h.entries, tensors)}
    by_role: dict[str, dict[str, torch.Tensor]] = {"token": {}, "seq": {}}
    cu = None
    for e, t in zip(h.entries, tensors):
        if e.role == "cu_seqlens":
            cu = t
        else:
            by_role[e.role][e.name] = t
    try:
        return PackedBatch(cu, by_role["token"], by_role["seq"], h.meta, h.seq_meta)
    except BatchError as err:
        raise WireError(err.field, err.reason) from err
