"""Wire format: round trips, zero copy in both directions, and headers that lie."""

from __future__ import annotations

import msgpack
import pytest
import torch

from tensors import wire
from tensors.errors import WireError
from tensors.packed import PackedBatch


def batch() -> PackedBatch:
    seqs = [
        {"input_ids": [1, 2, 3], "loss_mask": [False, True, True], "logprobs": [0.0, -1.0, -2.0],
         "versions": [-1, 4, 4], "rewards": 5.0, "group_ids": 0},
        {"input_ids": [7, 8], "loss_mask": [False, True], "logprobs": [0.0, -0.25],
         "versions": [-1, 5], "rewards": -5.0, "group_ids": 0},
    ]  # fmt: skip
    return PackedBatch.from_sequences(seqs, meta={"qids": ["q1", "q2"], "step": 9})


def shares_memory(t: torch.Tensor, buf) -> bool:
    mv = memoryview(buf)
    import numpy as np

    base = np.frombuffer(mv, dtype=np.uint8).ctypes.data
    return base <= t.data_ptr() < base + max(mv.nbytes, 1)


def test_batch_round_trip_keeps_fields_dtypes_and_meta():
    b = batch()
    header, buffers = wire.encode(b)
    out = wire.decode(header, [bytes(x) for x in buffers])
    assert isinstance(out, PackedBatch) and out.equals(b)
    assert out.meta == {"qids": ["q1", "q2"], "step": 9} and out.seq_meta == {"qids"}


def test_named_tensors_round_trip_all_dtypes():
    named = {name: torch.arange(6).reshape(2, 3).to(dt) for name, dt in wire.DTYPES.items() if dt != torch.bool}
    named["flag"] = torch.tensor([True, False])
    named["scalar"] = torch.tensor(3.5)
    named["empty"] = torch.zeros(0, 4)
    header, buffers = wire.encode(named)
    out = wire.decode(header, buffers)
    assert list(out) == list(named)
    for k, v in named.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        as_bytes = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731  (uint64/float8 lack ==)
        assert torch.equal(as_bytes(out[k]), as_bytes(v))


def test_encode_does_not_copy_the_tensors():
    t = torch.randn(1000)
    _, buffers = wire.encode({"t": t})
    assert shares_memory(t, buffers[0])
    t[0] = 123.0  # a change after encoding is visible through the buffer: same memory
    assert torch.frombuffer(buffers[0], dtype=torch.float32)[0] == 123.0


def test_decode_builds_tensors_on_the_buffers_without_copying():
    b = batch()
    header, buffers = wire.encode(b)
    owned = [bytearray(x) for x in buffers]
    out = wire.decode(header, owned)
    for entry_buf, t in zip(owned, [out.cu_seqlens, *out.tokens.values(), *out.seqs.values()]):
        assert shares_memory(t, entry_buf)


def test_decode_accepts_uint8_tensor_slices_zero_copy():
    t = {"a": torch.arange(10, dtype=torch.int64), "b": torch.ones(3, dtype=torch.bfloat16)}
    header, buffers = wire.encode(t)
    slab = torch.zeros(256, dtype=torch.uint8)
    slab[0:80].copy_(torch.frombuffer(buffers[0], dtype=torch.uint8))
    slab[128:134].copy_(torch.frombuffer(buffers[1], dtype=torch.uint8))
    out = wire.decode(header, [slab[0:80], slab[128:134]])
    assert torch.equal(out["a"], t["a"]) and torch.equal(out["b"], t["b"])
    assert out["a"].data_ptr() == slab.data_ptr()


def test_non_contiguous_and_grad_tensors_are_encoded():
    x = torch.arange(12.0, requires_grad=True).reshape(3, 4)
    out = wire.decode(*wire.encode({"xt": x.t()}))
    assert torch.equal(out["xt"], x.detach().t())


def _lie(header: bytes, i: int, key: str, value) -> bytes:
    raw = msgpack.unpackb(header)
    raw["tensors"][i][key] = value
    return msgpack.packb(raw)


@pytest.mark.parametrize("field_index, key, value, field, message", [
    (1, "nbytes", 999, "input_ids", "header says 999 bytes"),
    (1, "shape", [4], "input_ids", "needs 32"),
    (2, "dtype", "float128", "loss_mask", "unknown dtype"),
    (3, "shape", [-1], "logprobs", "non-negative"),
    (0, "role", "token", "cu_seqlens", "exactly one cu_seqlens"),
])  # fmt: skip
def test_a_header_that_lies_raises_wire_error_naming_the_field(field_index, key, value, field, message):
    header, buffers = wire.encode(batch())
    with pytest.raises(WireError, match=message) as info:
        wire.decode(_lie(header, field_index, key, value), buffers)
    assert info.value.field == field


def test_consistent_header_with_wrong_buffer_size_names_the_field():
    header, buffers = wire.encode(batch())
    # the header claims 5 logprobs (20 bytes) but only 4 arrive
    raw = msgpack.unpackb(header)
    names = [d["name"] for d in raw["tensors"]]
    short = list(buffers)
    short[names.index("logprobs")] = bytes(buffers[names.index("logprobs")])[:-4]
    with pytest.raises(WireError, match="buffer has 16 bytes but the header says 20") as info:
        wire.decode(header, short)
    assert info.value.field == "logprobs"


def test_header_and_buffers_that_agree_but_break_the_batch_name_the_field():
    header, buffers = wire.encode(batch())
    raw = msgpack.unpackb(header)
    raw["tensors"][0]["shape"] = [2]  # cu_seqlens with 2 entries: one sequence ...
    raw["tensors"][0]["nbytes"] = 8
    bad_cu = torch.tensor([0, 3], dtype=torch.int32)  # ... of 3 tokens, while token fields have 5
    with pytest.raises(WireError) as info:
        wire.decode(msgpack.packb(raw), [memoryview(bad_cu.numpy()), *buffers[1:]])
    assert info.value.field == "input_ids"


def test_wrong_buffer_count_and_garbage_header():
    header, buffers = wire.encode(batch())
    with pytest.raises(WireError, match="describes 7 tensors but 6 buffers"):
        wire.decode(header, buffers[:-1])
    with pytest.raises(WireError, match="not valid msgpack"):
        wire.decode(b"\xc1\xc1", buffers)
    with pytest.raises(WireError, match="unsupported wire version"):
        wire.decode(msgpack.packb({"v": 99}), [])


def test_checksum_detects_corruption():
    t = {"w": torch.arange(100, dtype=torch.float32)}
    header, buffers = wire.encode(t, checksum=True)
    assert torch.equal(wire.decode(header, buffers)["w"], t["w"])
    bad = bytearray(buffers[0])
    bad[7] ^= 0xFF
    with pytest.raises(WireError, match="checksum mismatch") as info:
        wire.decode(header, [bad])
    assert info.value.field == "w"


def test_unencodable_inputs_are_named():
    with pytest.raises(WireError, match="'meta'"):
        wire.encode(PackedBatch.from_sequences([{"input_ids": [1]}], meta={"bad": object()}))
    with pytest.raises(WireError, match="'c'.*not supported"):
        wire.encode({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(WireError, match="expected a torch.Tensor"):
        wire.encode({"x": [1, 2]})
    with pytest.raises(WireError, match="PackedBatch or a dict"):
        wire.encode([torch.zeros(1)])
