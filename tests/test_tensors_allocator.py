"""Micro-batch allocator: budget, exactly-once, few micro-batches, balance, ranks, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensors.allocator import allocate_micro_batches, lower_bound
from tensors.errors import AllocationError


def flat(out: list[list[list[int]]]) -> list[list[int]]:
    return [mb for rank in out for mb in rank]


def check_invariants(lengths, budget, n_ranks, out):
    assert len(out) == n_ranks
    assert len({len(r) for r in out}) == 1, "every rank gets the same number of micro-batches"
    mbs = flat(out)
    empties = sum(1 for mb in mbs if not mb)
    assert empties == max(0, len(mbs) - len(lengths)), "empty micro-batches only for spare rank slots"
    assert sorted(i for mb in mbs for i in mb) == list(range(len(lengths))), "every index exactly once"
    assert all(sum(lengths[i] for i in mb) <= budget for mb in mbs), "never over budget"
    assert all(mb == sorted(mb) for mb in mbs)


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 1000), min_size=1, max_size=200),
    budget=st.integers(1000, 4000),
    n_ranks=st.sampled_from([1, 2, 3, 4]),
)
def test_properties_on_random_lengths(lengths, budget, n_ranks):
    # The lower bound is not always reachable (e.g. lengths that pairwise overflow the budget), so
    # the count lies between it and one sequence per micro-batch, both rounded up to the ranks.
    bound = -(-max(lower_bound(lengths, budget), n_ranks) // n_ranks) * n_ranks
    one_each = -(-len(lengths) // n_ranks) * n_ranks
    out = allocate_micro_batches(lengths, budget, n_ranks)  # never refused: every length fits
    check_invariants(lengths, budget, n_ranks, out)
    assert bound <= len(flat(out)) <= max(bound, one_each)
    assert out == allocate_micro_batches(list(lengths), budget, n_ranks), "deterministic"


def test_reaches_the_lower_bound_on_a_long_tailed_batch():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.integers(64, 512, 2048) + rng.lognormal(np.log(3000), 1.0, 2048).astype(int), 27648)
    out = allocate_micro_batches(lengths, 65536)
    mbs = flat(out)
    assert len(mbs) <= lower_bound(lengths, 65536) + 1
    loads = np.array([lengths[mb].sum() for mb in mbs])
    assert loads.max() / loads.mean() <= 1.05
    check_invariants(lengths.tolist(), 65536, 1, out)


def test_balances_when_the_budget_is_loose():
    lengths = [900, 800, 700, 600, 500, 400, 300, 200, 100, 100, 100, 100]  # 4800 tokens
    out = allocate_micro_batches(lengths, 2000)  # lower bound 3: loads should be about 1600 each
    loads = [sum(lengths[i] for i in mb) for mb in flat(out)]
    assert len(loads) == 3 and max(loads) <= 1700, loads


def test_tight_budget_still_fits_with_best_fit():
    # 3 micro-batches of exactly 100 are possible; largest-first into the least-loaded would overflow
    lengths = [60, 40, 55, 45, 50, 30, 20]
    out = allocate_micro_batches(lengths, 100)
    check_invariants(lengths, 100, 1, out)
    assert len(flat(out)) == 3


def test_ranks_get_equal_counts_and_similar_tokens():
    rng = np.random.default_rng(1)
    lengths = rng.integers(100, 4000, 500)
    out = allocate_micro_batches(lengths, 16384, n_ranks=4)
    check_invariants(lengths.tolist(), 16384, 4, out)
    per_rank = [sum(int(lengths[i]) for mb in r for i in mb) for r in out]
    assert max(per_rank) / (sum(per_rank) / 4) <= 1.05


def test_fewer_sequences_than_rank_slots_gives_an_empty_micro_batch():
    # Every pair overflows 1000 tokens: 3 micro-batches needed, 4 slots on 2 ranks, one stays empty.
    # This example once failed test_properties_on_random_lengths with an AllocationError.
    lengths = [432, 569, 569]
    out = allocate_micro_batches(lengths, 1000, n_ranks=2)
    check_invariants(lengths, 1000, 2, out)
    assert [len(r) for r in out] == [2, 2]
    assert sorted(len(mb) for mb in flat(out)) == [0, 1, 1, 1]
    per_rank = sorted(sum(lengths[i] for mb in r for i in mb) for r in out)
    assert per_rank == [569, 1001], "the two heaviest go to different ranks"


def test_more_ranks_than_sequences_pads_with_empty_micro_batches():
    out = allocate_micro_batches([8, 8, 8], 10, n_ranks=4)
    check_invariants([8, 8, 8], 10, 4, out)
    assert sorted(map(len, flat(out))) == [0, 1, 1, 1]


def test_one_sequence_over_budget_is_named():
    with pytest.raises(AllocationError, match=r"sequence 2 has 5000 tokens, more than max_tokens=4096"):
        allocate_micro_batches([10, 20, 5000, 30], 4096)


@pytest.mark.parametrize("lengths, budget, n_ranks, message", [
    ([1, 0, 3], 10, 1, "sequence 1 has length 0"),
    ([1.5, 2.0], 10, 1, "must be integers"),
    ([[1, 2]], 10, 1, "one-dimensional"),
    ([1, 2], 0, 1, "max_tokens must be a positive integer"),
    ([1, 2], 10, 0, "n_ranks must be a positive integer"),
])  # fmt: skip
def test_bad_inputs_are_refused(lengths, budget, n_ranks, message):
    with pytest.raises(AllocationError, match=message):
        allocate_micro_batches(lengths, budget, n_ranks)


def test_accepts_tensors_and_empty_input():
    out = allocate_micro_batches(torch.tensor([5, 6, 7], dtype=torch.int32), 11)
    assert out == allocate_micro_batches(np.array([5, 6, 7]), 11) == allocate_micro_batches([5, 6, 7], 11)
    check_invariants([5, 6, 7], 11, 1, out)
    assert len(flat(out)) == 2
    assert allocate_micro_batches([], 100, n_ranks=2) == [[], []]


def test_long_sequences_each_get_their_own_micro_batch():
    lengths = [60, 60, 60, 10]  # three over half the budget: at least three micro-batches
    out = allocate_micro_batches(lengths, 100)
    assert len(flat(out)) == 3 == lower_bound(lengths, 100)
