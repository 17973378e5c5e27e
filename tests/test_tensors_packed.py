"""PackedBatch: construction, select / concat / split round trips, the meta rule, and clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensors.errors import BatchError
from tensors.packed import PackedBatch, is_per_sequence


def make_seq(i: int, length: int, prompt: int = 1) -> dict:
    prompt = min(prompt, length)
    return {
        "input_ids": [100 * i + t for t in range(length)],
        "loss_mask": [False] * prompt + [True] * (length - prompt),
        "logprobs": [0.0] * prompt + [-0.5 - t for t in range(length - prompt)],
        "versions": [-1] * prompt + [i] * (length - prompt),
        "rewards": 5.0 if i % 2 else -5.0,
        "group_ids": i // 2,
    }


def make_batch(lengths: list[int], meta: dict | None = None) -> PackedBatch:
    return PackedBatch.from_sequences([make_seq(i, n) for i, n in enumerate(lengths)], meta=meta)


def test_from_sequences_packs_without_padding():
    b = make_batch([3, 1, 4], meta={"qids": ["a", "b", "c"], "step": 7})
    assert b.cu_seqlens.tolist() == [0, 3, 4, 8] and b.cu_seqlens.dtype == torch.int32
    assert b.num_seqs == 3 and b.num_tokens == 8 and b.seqlens.tolist() == [3, 1, 4]
    assert b.input_ids.tolist() == [0, 1, 2, 100, 200, 201, 202, 203]
    assert b.input_ids.dtype == torch.int64 and b.loss_mask.dtype == torch.bool
    assert b.logprobs.dtype == torch.float32 and b.versions.dtype == torch.int32
    assert b.rewards.tolist() == [-5.0, 5.0, -5.0] and b.rewards.dtype == torch.float32
    assert b.group_ids.tolist() == [0, 0, 1] and b.group_ids.dtype == torch.int64
    assert b.loss_mask.tolist() == [False, True, True, False, False, True, True, True]
    assert b.versions.tolist() == [-1, 0, 0, -1, -1, 2, 2, 2]


def test_sequences_inverts_from_sequences():
    b = make_batch([2, 5, 1], meta={"qids": ["x", "y", "z"]})
    again = PackedBatch.from_sequences(b.sequences(), meta=b.meta)
    assert again.equals(b)


def test_extra_fields_are_classified_by_shape():
    seqs = [dict(make_seq(i, n), adv=[0.1] * n, score=i) for i, n in enumerate([2, 3])]
    b = PackedBatch.from_sequences(seqs)
    assert "adv" in b.tokens and b["adv"].shape == (5,)
    assert "score" in b.seqs and b["score"].tolist() == [0, 1]
    b2 = b.with_fields(tokens={"prox": torch.zeros(5)}, seqs={"w": torch.ones(2)})
    assert "prox" in b2.tokens and "w" in b2.seqs and "prox" not in b.tokens


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=12),
    data=st.data(),
)
def test_select_concat_split_round_trips(lengths, data):
    n = len(lengths)
    b = make_batch(lengths, meta={"qids": [f"q{i}" for i in range(n)], "note": {"k": 1}})
    order = data.draw(st.permutations(range(n)))
    picked = b.select(order)
    # every selected sequence is the original one, field by field
    seqs, orig = picked.sequences(), b.sequences()
    for pos, i in enumerate(order):
        for key in ("input_ids", "loss_mask", "logprobs", "versions"):
            assert torch.equal(seqs[pos][key], orig[i][key])
        assert seqs[pos]["rewards"] == orig[i]["rewards"] and seqs[pos]["group_ids"] == orig[i]["group_ids"]
    assert picked.meta["qids"] == [f"q{i}" for i in order] and picked.meta["note"] == {"k": 1}
    assert int(picked.cu_seqlens[-1]) == sum(lengths) == picked.num_tokens
    # split into contiguous groups, concat back: the same batch
    cut = data.draw(st.integers(0, n))
    parts = b.split([list(range(cut)), list(range(cut, n))])
    assert PackedBatch.concat([p for p in parts]).equals(b)
    # select the inverse permutation undoes the permutation
    inverse = sorted(range(n), key=lambda k: order[k])
    assert picked.select(inverse).equals(b)


def test_select_allows_duplicates_and_empty():
    b = make_batch([2, 3])
    d = b.select([1, 1])
    assert d.num_seqs == 2 and d.input_ids.tolist() == [100, 101, 102, 100, 101, 102]
    e = b.select([])
    assert e.num_seqs == 0 and e.num_tokens == 0 and e.cu_seqlens.tolist() == [0]


def test_select_copies_rather_than_aliasing():
    b = make_batch([2, 3])
    s = b.select([0, 1])
    s.input_ids[0] = -7
    assert b.input_ids[0] == 0


def test_meta_rule_per_sequence_vs_batch_level():
    b = make_batch([1, 2, 3], meta={"qids": ["a", "b", "c"], "pair": [1, 2], "step": 3})
    assert is_per_sequence(b.meta["qids"], 3) and not is_per_sequence(b.meta["pair"], 3)
    s = b.select([2, 0])
    assert s.meta == {"qids": ["c", "a"], "pair": [1, 2], "step": 3}
    c = PackedBatch.concat([b, s])
    assert c.meta["qids"] == ["a", "b", "c", "c", "a"] and c.meta["step"] == 3


def test_per_sequence_keys_are_carried_not_guessed_again():
    b = make_batch([1, 2, 3], meta={"qids": ["a", "b", "c"], "pair": [1, 2]})
    assert b.seq_meta == {"qids"}
    two = b.select([0, 1])  # "pair" now has the batch's length but stays batch-level
    assert two.seq_meta == {"qids"} and two.select([1]).meta["pair"] == [1, 2]
    forced = make_batch([1, 2, 3], meta={"tags": ["x", "y", "z"]}).with_fields()
    forced = type(forced)(forced.cu_seqlens, forced.tokens, forced.seqs, forced.meta, frozenset())
    assert forced.select([0]).meta["tags"] == ["x", "y", "z"]
    with pytest.raises(BatchError, match="must be a list of 3 items"):
        type(b)(b.cu_seqlens, b.tokens, b.seqs, {"k": 1}, frozenset({"k"}))


def test_concat_rejects_conflicting_batch_level_meta():
    a = make_batch([1], meta={"step": 1})
    b = make_batch([2], meta={"step": 2})
    with pytest.raises(BatchError, match="'step' differs"):
        PackedBatch.concat([a, b])
    with pytest.raises(BatchError, match="missing"):
        PackedBatch.concat([a, make_batch([2])])


def test_concat_rejects_mismatched_fields():
    a = make_batch([2])
    b = a.with_fields(tokens={"extra": torch.zeros(2)})
    with pytest.raises(BatchError, match="extra"):
        PackedBatch.concat([a, b])
    c = PackedBatch(a.cu_seqlens, {**a.tokens, "logprobs": a.logprobs}, dict(a.seqs))
    c2 = PackedBatch(a.cu_seqlens, {**a.tokens}, {**a.seqs, "score": torch.zeros(1)})
    with pytest.raises(BatchError, match="score"):
        PackedBatch.concat([c, c2])
    with pytest.raises(BatchError, match="at least one"):
        PackedBatch.concat([])


@pytest.mark.parametrize(
    "mutate, field, message",
    [
        (lambda b: {"cu_seqlens": b.cu_seqlens.long()}, "cu_seqlens", "int32"),
        (lambda b: {"cu_seqlens": torch.tensor([1, 3], dtype=torch.int32)}, "cu_seqlens", "start at 0"),
        (lambda b: {"cu_seqlens": torch.tensor([0, 3, 3], dtype=torch.int32)}, "cu_seqlens", "length 0"),
        (lambda b: {"tokens": {**b.tokens, "logprobs": b.logprobs.double()}}, "logprobs", "float32"),
        (lambda b: {"tokens": {**b.tokens, "loss_mask": b.loss_mask[:-1]}}, "loss_mask", "first dimension 3"),
        (lambda b: {"seqs": {**b.seqs, "rewards": torch.zeros(2)}}, "rewards", "first dimension 1"),
        (lambda b: {"tokens": {k: v for k, v in b.tokens.items() if k != "input_ids"}}, "input_ids", "needs"),
        (lambda b: {"seqs": {**b.seqs, "input_ids": torch.zeros(1, dtype=torch.int64)}}, "input_ids", "both"),
    ],
)
def test_inconsistent_batches_are_refused_naming_the_field(mutate, field, message):
    b = make_batch([3])
    args = {"cu_seqlens": b.cu_seqlens, "tokens": b.tokens, "seqs": b.seqs}
    args.update(mutate(b))
    with pytest.raises(BatchError, match=message) as info:
        PackedBatch(**args)
    assert info.value.field == field


def test_from_sequences_errors_name_the_sequence():
    good = make_seq(0, 3)
    with pytest.raises(BatchError, match="sequence 1 has 2 values but 3 tokens"):
        PackedBatch.from_sequences([good, dict(make_seq(1, 3), logprobs=[0.0, 0.0])])
    with pytest.raises(BatchError, match="sequence 1 has different keys"):
        PackedBatch.from_sequences([good, {k: v for k, v in make_seq(1, 3).items() if k != "rewards"}])
    with pytest.raises(BatchError, match="sequence 0 has no tokens"):
        PackedBatch.from_sequences([dict(make_seq(0, 1), input_ids=[], loss_mask=[], logprobs=[], versions=[])])
    with pytest.raises(BatchError, match="put per-sequence data like this in meta"):
        PackedBatch.from_sequences([dict(good, qid="q1")])
    with pytest.raises(BatchError, match="at least one"):
        PackedBatch.from_sequences([])


def test_select_out_of_range_is_an_error():
    b = make_batch([2, 2])
    with pytest.raises(BatchError, match="index 2 is out of range"):
        b.select([0, 2])
    with pytest.raises(BatchError, match="index -1"):
        b.select([-1])


def test_missing_field_access_lists_the_fields():
    b = PackedBatch.from_sequences([{"input_ids": [1, 2], "loss_mask": [True, True]}])
    with pytest.raises(KeyError, match="no field 'rewards'"):
        _ = b.rewards


def test_to_keeps_everything():
    b = make_batch([2, 3], meta={"qids": ["a", "b"]})
    moved = b.to("cpu")
    assert moved.equals(b) and moved.device.type == "cpu"
