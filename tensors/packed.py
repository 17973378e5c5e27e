"""PackedBatch: variable-length sequences concatenated into 1D tensors, delimited by `cu_seqlens`.

No padding anywhere.  A batch holds three kinds of data:

* token fields (`tokens`): tensors whose first dimension is T = cu_seqlens[-1], one row per token;
* sequence fields (`seqs`): tensors whose first dimension is S = number of sequences;
* `meta`: a msgpack-able dict.  Its keys named in `seq_meta` hold *per-sequence* lists (length S)
  that follow their sequences through `select`, `split` and `concat`; every other key is *batch
  level*: `select` and `split` keep it as is and `concat` requires it equal in every batch.
  When a batch is built without an explicit `seq_meta`, the keys whose value is a ``list`` of
  length S are taken as per-sequence; from then on the set is carried explicitly (through
  select/concat and the wire), never guessed again, so a later batch of another size cannot
  mistake a batch-level list for a per-sequence one.  Pass `seq_meta` yourself to override.

The RL fields have fixed dtypes (see TOKEN_DTYPES / SEQ_DTYPES); any other named field is allowed.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tensors.errors import BatchError

TOKEN_DTYPES: dict[str, torch.dtype] = {
    "input_ids": torch.int64,  # token ids
    "loss_mask": torch.bool,  # False on prompt tokens, True on generated ones
    "logprobs": torch.float32,  # behaviour logprob of token i given tokens < i; 0 on prompt tokens
    "versions": torch.int32,  # policy version that generated token i; -1 on prompt tokens
}
SEQ_DTYPES: dict[str, torch.dtype] = {
    "rewards": torch.float32,
    "group_ids": torch.int64,  # sequences answering the same prompt share a group id
}
RESERVED_NAMES = frozenset({"cu_seqlens"})


def is_per_sequence(value: Any, num_seqs: int) -> bool:
    """How a new batch's per-sequence meta keys are recognised: a list of exactly `num_seqs` items."""
    return isinstance(value, list) and len(value) == num_seqs


def _field(name: str) -> property:
    """A read-only attribute for the field `name` (`batch.rewards` is `batch["rewards"]`)."""
    return property(lambda self: self[name], doc=f"The {name!r} field.")


@dataclass(eq=False, repr=False)
class PackedBatch:
    cu_seqlens: torch.Tensor
    tokens: dict[str, torch.Tensor]
    seqs: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    seq_meta: frozenset[str] | None = None  # per-sequence meta keys; None: lists of length S

    def __post_init__(self) -> None:
        self.tokens = dict(self.tokens)
        self.seqs = dict(self.seqs)
        self.meta = dict(self.meta) if self.meta is not None else {}
        _validate(self)
        if self.seq_meta is None:
            self.seq_meta = frozenset(k for k, v in self.meta.items() if is_per_sequence(v, self.num_seqs))
        self.seq_meta = frozenset(self.seq_meta)
        for key in self.seq_meta:
            if not is_per_sequence(self.meta.get(key), self.num_seqs):
                raise BatchError("meta", f"per-sequence key {key!r} must be a list of {self.num_seqs} items")

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def seqlens(self) -> torch.Tensor:
        """Length of each sequence (int32 [S])."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    # ---- the RL fields (a missing one is a KeyError naming the fields there are) -------------------
    input_ids = _field("input_ids")
    loss_mask = _field("loss_mask")
    logprobs = _field("logprobs")
    versions = _field("versions")
    rewards = _field("rewards")
    group_ids = _field("group_ids")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.tokens:
            return self.tokens[name]
        if name in self.seqs:
            return self.seqs[name]
        raise KeyError(
            f"PackedBatch has no field {name!r}; token fields: {sorted(self.tokens)}, "
            f"sequence fields: {sorted(self.seqs)}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self.tokens or name in self.seqs

    def __repr__(self) -> str:
        return (
            f"PackedBatch(num_seqs={self.num_seqs}, num_tokens={self.num_tokens}, "
            f"tokens={sorted(self.tokens)}, seqs={sorted(self.seqs)}, meta={sorted(self.meta)}, "
            f"device={self.device})"
        )

    def with_fields(
        self, *, tokens: Mapping[str, torch.Tensor] | None = None, seqs: Mapping[str, torch.Tensor] | None = None
    ) -> PackedBatch:
        """A new batch sharing this one's tensors, with token/sequence fields added or replaced."""
        return PackedBatch(
            self.cu_seqlens, {**self.tokens, **(tokens or {})}, {**self.seqs, **(seqs or {})}, dict(self.meta),
            self.seq_meta,
        )

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_sequences(
        cls, sequences: Sequence[Mapping[str, Any]], meta: dict | None = None, seq_meta: Iterable[str] | None = None
    ) -> PackedBatch:
        """Pack a list of per-sequence dicts.

        Every dict has the same keys and at least `input_ids`.  A value that is a scalar (number or
        0-dim tensor) becomes a sequence field; a value whose first dimension equals the sequence's
        length becomes a token field.  The RL fields are cast to their fixed dtypes.
        """
        if not sequences:
            raise BatchError("input_ids", "from_sequences needs at least one sequence")
        keys = list(sequences[0].keys())
        if "input_ids" not in keys:
            raise BatchError("input_ids", "sequence 0 has no 'input_ids'")
        key_set = set(keys)
        for i, seq in enumerate(sequences):
            if set(seq.keys()) != key_set:
                missing, extra = sorted(key_set - set(seq.keys())), sorted(set(seq.keys()) - key_set)
                raise BatchError(
                    "input_ids", f"sequence {i} has different keys than sequence 0 (missing {missing}, extra {extra})"
                )
        lengths = [_length(seq["input_ids"], i) for i, seq in enumerate(sequences)]
        for i, n in enumerate(lengths):
            if n < 1:
                raise BatchError("input_ids", f"sequence {i} has no tokens")
        cu = torch.zeros(len(sequences) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        tokens: dict[str, torch.Tensor] = {}
        seqs: dict[str, torch.Tensor] = {}
        for key in keys:
            values = [seq[key] for seq in sequences]
            for i, v in enumerate(values):
                if isinstance(v, (str, bytes, dict)) or v is None:
                    raise BatchError(
                        key, f"sequence {i}: {type(v).__name__} is not numeric; put per-sequence data like this "
                        "in meta as a list"
                    )
            if key in SEQ_DTYPES or (key not in TOKEN_DTYPES and _is_scalar(values[0])):
                seqs[key] = _stack_scalars(key, values, SEQ_DTYPES.get(key))
            else:
                tokens[key] = _cat_token_values(key, values, lengths, TOKEN_DTYPES.get(key))
        return cls(cu, tokens, seqs, dict(meta or {}), None if seq_meta is None else frozenset(seq_meta))

    def sequences(self) -> list[dict[str, Any]]:
        """The inverse of `from_sequences`: one dict per sequence (token fields as tensor views)."""
        bounds = self.cu_seqlens.tolist()
        out: list[dict[str, Any]] = []
        for i in range(self.num_seqs):
            a, b = bounds[i], bounds[i + 1]
            item: dict[str, Any] = {k: v[a:b] for k, v in self.tokens.items()}
            for k, v in self.seqs.items():
                item[k] = v[i].item() if v.dim() == 1 else v[i]
            out.append(item)
        return out

    # ---- selection ---------------------------------------------------------------------------
    def select(self, seq_indices: Iterable[int] | torch.Tensor) -> PackedBatch:
        """A new batch with the given sequences, in the given order (a copy; duplicates allowed)."""
        idx = _as_index(seq_indices, self.num_seqs, self.device)
        lens = self.seqlens.long().index_select(0, idx)
        starts = self.cu_seqlens[:-1].long().index_select(0, idx)
        new_cu = torch.zeros(idx.shape[0] + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(lens, 0, out=new_cu[1:])
        total = int(new_cu[-1])
        shift = torch.repeat_interleave(starts - new_cu[:-1], lens, output_size=total)
        token_idx = shift + torch.arange(total, device=self.device)
        idx_list = idx.tolist()
        meta = {k: [v[i] for i in idx_list] if k in self.seq_meta else v for k, v in self.meta.items()}
        return PackedBatch(
            new_cu.to(torch.int32),
            {k: v.index_select(0, token_idx) for k, v in self.tokens.items()},
            {k: v.index_select(0, idx) for k, v in self.seqs.items()},
            meta,
            self.seq_meta,
        )

    def split(self, groups: Iterable[Iterable[int]]) -> list[PackedBatch]:
        """One batch per group of sequence indices (e.g. the allocator's micro-batches)."""
        return [self.select(g) for g in groups]

    @staticmethod
    def concat(batches: Sequence[PackedBatch]) -> PackedBatch:
        """Sequences of all batches, in order.  Field names, dtypes and devices must agree."""
        batches = list(batches)
        if not batches:
            raise BatchError("cu_seqlens", "concat needs at least one batch")
        first = batches[0]
        for j, b in enumerate(batches[1:], start=1):
            _check_compatible(first, b, j)
        lens = torch.cat([b.seqlens for b in batches]).long()
        cu = torch.zeros(lens.shape[0] + 1, dtype=torch.int64, device=first.device)
        torch.cumsum(lens, 0, out=cu[1:])
        return PackedBatch(
            cu.to(torch.int32),
            {k: torch.cat([b.tokens[k] for b in batches]) for k in first.tokens},
            {k: torch.cat([b.seqs[k] for b in batches]) for k in first.seqs},
            *_concat_meta(batches),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return PackedBatch(
            move(self.cu_seqlens),
            {k: move(v) for k, v in self.tokens.items()},
            {k: move(v) for k, v in self.seqs.items()},
            dict(self.meta),
            self.seq_meta,
        )

    def equals(self, other: PackedBatch) -> bool:
        """Same sequences, fields (names, dtypes, values) and meta."""
        if not isinstance(other, PackedBatch) or not torch.equal(self.cu_seqlens, other.cu_seqlens):
            return False
        if self.tokens.keys() != other.tokens.keys() or self.seqs.keys() != other.seqs.keys():
            return False
        pairs = [(v, other.tokens[k]) for k, v in self.tokens.items()] + [
            (v, other.seqs[k]) for k, v in self.seqs.items()
        ]
        same_tensors = all(a.dtype == b.dtype and torch.equal(a, b) for a, b in pairs)
        return same_tensors and self.meta == other.meta and self.seq_meta == other.seq_meta


# ---- validation (pure helpers) ---------------------------------------------------------------


def _validate(batch: PackedBatch) -> None:
    cu = batch.cu_seqlens
    if not isinstance(cu, torch.Tensor):
        raise BatchError("cu_seqlens", f"must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
        raise BatchError("cu_seqlens", f"must be a 1D int32 tensor of S+1 offsets, got {cu.dtype} {tuple(cu.shape)}")
    if int(cu[0]) != 0:
        raise BatchError("cu_seqlens", f"must start at 0, starts at {int(cu[0])}")
    if cu.shape[0] > 1:
        lens = cu[1:] - cu[:-1]
        if not bool((lens >= 1).all()):
            bad = int(torch.nonzero(lens < 1)[0, 0])
            raise BatchError("cu_seqlens", f"sequence {bad} has length {int(lens[bad])}; lengths must be >= 1")
    num_tokens, num_seqs = int(cu[-1]), cu.shape[0] - 1
    if "input_ids" not in batch.tokens:
        raise BatchError("input_ids", "every PackedBatch needs an 'input_ids' token field")
    overlap = set(batch.tokens) & set(batch.seqs)
    if overlap:
        raise BatchError(sorted(overlap)[0], "is both a token field and a sequence field")
    for kind, fields, n, fixed in (
        ("token", batch.tokens, num_tokens, TOKEN_DTYPES),
        ("sequence", batch.seqs, num_seqs, SEQ_DTYPES),
    ):
        for name, t in fields.items():
            if not isinstance(name, str) or name in RESERVED_NAMES:
                raise BatchError(str(name), "field names must be strings other than 'cu_seqlens'")
            if not isinstance(t, torch.Tensor):
                raise BatchError(name, f"must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 1 or t.shape[0] != n:
                raise BatchError(name, f"{kind} field must have first dimension {n}, has shape {tuple(t.shape)}")
            if name in fixed and t.dtype != fixed[name]:
                raise BatchError(name, f"must have dtype {fixed[name]}, has {t.dtype}")
            if t.device != cu.device:
                raise BatchError(name, f"is on {t.device} but cu_seqlens is on {cu.device}")
    if not isinstance(batch.meta, dict) or not all(isinstance(k, str) for k in batch.meta):
        raise BatchError("meta", "must be a dict with string keys")


def _check_compatible(first: PackedBatch, other: PackedBatch, j: int) -> None:
    for kind, a, b in (("token", first.tokens, other.tokens), ("sequence", first.seqs, other.seqs)):
        if a.keys() != b.keys():
            raise BatchError(
                sorted(set(a) ^ set(b))[0],
                f"batch {j} has {kind} fields {sorted(b)} but batch 0 has {sorted(a)}",
            )
        for name in a:
            if a[name].dtype != b[name].dtype or a[name].shape[1:] != b[name].shape[1:]:
                raise BatchError(
                    name,
                    f"batch {j} has {b[name].dtype} {tuple(b[name].shape[1:])} per row, "
                    f"batch 0 has {a[name].dtype} {tuple(a[name].shape[1:])}",
                )
    if other.device != first.device:
        raise BatchError("cu_seqlens", f"batch {j} is on {other.device}, batch 0 on {first.device}")


def _concat_meta(batches: list[PackedBatch]) -> tuple[dict[str, Any], frozenset[str]]:
    out: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for b in batches for k in b.meta))
    for key in keys:
        missing = [j for j, b in enumerate(batches) if key not in b.meta]
        if missing:
            raise BatchError("meta", f"key {key!r} is missing in batch {missing[0]}")
        per_seq = [key in b.seq_meta for b in batches]
        if all(per_seq):
            out[key] = [x for b in batches for x in b.meta[key]]
        elif not any(per_seq):
            value = batches[0].meta[key]
            for j, b in enumerate(batches[1:], start=1):
                if b.meta[key] != value:
                    raise BatchError("meta", f"batch-level key {key!r} differs between batch 0 and batch {j}")
            out[key] = value
        else:
            j = per_seq.index(not per_seq[0])
            raise BatchError(
                "meta", f"key {key!r} is per-sequence in one batch and batch-level in another (batch 0 vs {j})"
            )
    return out, frozenset(k for k in keys if k in batches[0].seq_meta)


def _as_index(seq_indices: Iterable[int] | torch.Tensor, num_seqs: int, device: torch.device) -> torch.Tensor:
    if isinstance(seq_indices, torch.Tensor):
        idx = seq_indices.to(device=device, dtype=torch.int64).reshape(-1)
    else:
        idx = torch.tensor([int(i) for i in seq_indices], dtype=torch.int64, device=device)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_seqs):
        bad = int(idx[(idx < 0) | (idx >= num_seqs)][0])
        raise BatchError("cu_seqlens", f"sequence index {bad} is out of range for a batch of {num_seqs} sequences")
    return idx


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, (numbers.Number, bool)) or (hasattr(value, "shape") and value.shape == ())


def _length(value: Any, i: int) -> int:
    if _is_scalar(value):
        raise BatchError("input_ids", f"sequence {i}: input_ids must be a list or 1D tensor, got a scalar")
    return len(value)


def _stack_scalars(key: str, values: list[Any], dtype: torch.dtype | None) -> torch.Tensor:
    for i, v in enumerate(values):
        if not _is_scalar(v):
            raise BatchError(key, f"sequence {i}: expected a scalar per sequence, got {type(v).__name__}")
    if isinstance(values[0], torch.Tensor):
        out = torch.stack([torch.as_tensor(v) for v in values])
        return out.to(dtype) if dtype is not None else out
    try:
        return torch.tensor(values, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as e:
        raise BatchError(key, f"cannot make a tensor of the per-sequence values: {e}") from e


def _cat_token_values(key: str, values: list[Any], lengths: list[int], dtype: torch.dtype | None) -> torch.Tensor:
    for i, (v, n) in enumerate(zip(values, lengths)):
        if _is_scalar(v):
            raise BatchError(key, f"sequence {i}: got a scalar, expected {n} values (one per token)")
        if len(v) != n:
            raise BatchError(key, f"sequence {i} has {len(v)} values but {n} tokens")
    try:
        if all(isinstance(v, (list, tuple)) for v in values):
            flat = list(itertools.chain.from_iterable(values))
            return torch.tensor(flat, dtype=dtype) if flat else torch.empty(0, dtype=dtype)
        parts = [torch.as_tensor(v) for v in values]
        out = torch.cat(parts)
        return out.to(dtype) if dtype is not None else out
    except (TypeError, ValueError, RuntimeError) as e:
        raise BatchError(key, f"cannot make a token tensor: {e}") from e
