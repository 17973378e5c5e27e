"""Micro-batch allocation: split sequences into as few token-budgeted micro-batches as possible, balanced.

The count starts at the lower bound k = max(ceil(sum / budget), #sequences longer than budget/2) and
grows only when no packing into k micro-batches is found.  For each k:

1. largest-first into the least-loaded micro-batch (LPT): balanced by construction, but it fails when
   the budget is tight (its loads differ by about the shortest sequence, so it is skipped when the
   free tokens per micro-batch are fewer than that);
2. otherwise best-fit decreasing restricted to k micro-batches (resumed, not restarted, at k + 1),
   which packs tightly.
Then a swap pass (move or exchange one sequence between the heaviest and one of the lightest
micro-batches) evens out the loads without ever exceeding the budget.

With n_ranks > 1 the count is a multiple of n_ranks and the micro-batches are dealt to ranks so
that every rank gets the same number and about the same tokens.  When that count exceeds the number
of sequences (fewer sequences than rank slots, e.g. 3 sequences that pairwise overflow the budget on
2 ranks need 4 slots) the spare slots are empty micro-batches rather than a refusal: a batch that
one rank could train is never refused.  Everything is deterministic.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Sequence

import numpy as np

from tensors.errors import AllocationError

_BALANCE_TOLERANCE = 0.005  # stop the swap pass once max load <= mean * (1 + this)
_LPT_TRIES = 3  # LPT is tried at the first few counts only; best fit resumes cheaply


def allocate_micro_batches(
    lengths: Sequence[int] | np.ndarray, max_tokens: int, n_ranks: int = 1
) -> list[list[list[int]]]:
    """Per rank, the micro-batches as sorted lists of sequence indices.

    Never exceeds `max_tokens` per micro-batch, puts every index in exactly one micro-batch and gives
    every rank the same number of micro-batches.  Micro-batches are empty only when there are more
    of them than sequences (so callers that train on each must skip empty ones).  Raises
    AllocationError naming a sequence longer than the budget, or on malformed arguments.
    """
    lens = _validate(lengths, max_tokens, n_ranks)
    if lens.size == 0:
        return [[] for _ in range(n_ranks)]
    n_seqs = int(lens.size)
    order = np.argsort(-lens, kind="stable")
    items = list(zip(order.tolist(), lens[order].tolist()))
    total, shortest = int(lens.sum()), int(lens.min())
    k = _round_up(max(lower_bound(lens, max_tokens), n_ranks), n_ranks)
    best_fit = _BestFit(items, max_tokens)
    for attempt in itertools.count():
        # LPT's loads differ by about the shortest sequence: skip it when the free room is smaller.
        bins = None
        if attempt < _LPT_TRIES and (k * max_tokens - total) / k >= shortest:
            bins = _largest_first(items, k, max_tokens)
        if bins is None and best_fit.run(k):
            bins = best_fit.bins
        if bins is not None:
            break
        assert k < n_seqs, "one sequence per micro-batch always fits: _validate checked each"
        k += n_ranks
    bins += [[] for _ in range(k - len(bins))]
    loads = np.array([int(lens[b].sum()) for b in bins], dtype=np.int64)
    _fill_empty(bins, loads, lens)
    _rebalance(bins, loads, lens, rounds=4 * k + 64)
    return _deal_to_ranks(bins, loads, n_ranks)


def lower_bound(lengths: Sequence[int] | np.ndarray, max_tokens: int) -> int:
    """No packing uses fewer micro-batches: total tokens / budget, and one per sequence over half the budget."""
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.size == 0:
        return 0
    return max(math.ceil(int(lens.sum()) / max_tokens), int((2 * lens > max_tokens).sum()))


# ---- the packing steps (pure, operate on (index, length) items sorted by decreasing length) -------


def _largest_first(items: list[tuple[int, int]], k: int, budget: int) -> list[list[int]] | None:
    heap = [(0, b) for b in range(k)]
    bins: list[list[int]] = [[] for _ in range(k)]
    for i, n in items:
        load, b = heap[0]
        if load + n > budget:  # the least-loaded bin is the only candidate: nothing fits
            return None
        heapq.heapreplace(heap, (load + n, b))
        bins[b].append(i)
    return bins


class _BestFit:
    """Best-fit decreasing with a cap on open micro-batches, resumable with a higher cap.

    Until the cap is hit the decisions do not depend on it, so resuming after a failure at k with
    cap k' gives exactly best fit with cap k'; the whole search costs one pass.
    """

    def __init__(self, items: list[tuple[int, int]], budget: int):
        self.items, self.budget, self.pos = items, budget, 0
        self.gaps: list[tuple[int, int]] = []  # sorted (free tokens, bin) of open, not yet full bins
        self.bins: list[list[int]] = []

    def run(self, cap: int) -> bool:
        items, gaps, bins, budget = self.items, self.gaps, self.bins, self.budget
        for pos in range(self.pos, len(items)):
            i, n = items[pos]
            j = bisect.bisect_left(gaps, (n, -1))
            if j < len(gaps):
                gap, b = gaps.pop(j)
                bins[b].append(i)
                if gap > n:
                    bisect.insort(gaps, (gap - n, b))
            elif len(bins) < cap:
                bins.append([i])
                if budget > n:
                    bisect.insort(gaps, (budget - n, len(bins) - 1))
            else:
                self.pos = pos
                return False
        self.pos = len(items)
        return True


def _fill_empty(bins: list[list[int]], loads: np.ndarray, lens: np.ndarray) -> None:
    """Give every empty micro-batch the shortest sequence of the heaviest micro-batch holding two or more.

    Stops when no micro-batch holds two: with more micro-batches than sequences some stay empty.
    """
    for e in [b for b in range(len(bins)) if not bins[b]]:
        donors = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not donors:
            return
        donor = max(donors, key=lambda b: (loads[b], -b))
        i = min(bins[donor], key=lambda i: (lens[i], i))
        bins[donor].remove(i)
        bins[e].append(i)
        loads[donor] -= lens[i]
        loads[e] += lens[i]


def _rebalance(bins: list[list[int]], loads: np.ndarray, lens: np.ndarray, rounds: int) -> None:
    """Lower the heaviest micro-batch by a move or swap with one of the lightest, while that helps.

    A change only ever makes both micro-batches lighter than the old maximum, so the budget holds.
    """
    if len(bins) < 2:
        return
    for _ in range(rounds):
        a = int(np.argmax(loads))
        if loads[a] <= loads.mean() * (1 + _BALANCE_TOLERANCE):
            return
        for b in np.argsort(loads, kind="stable")[:4].tolist():
            gap = int(loads[a] - loads[b])
            if b == a or gap <= 1:
                continue
            give = lens[bins[a]]
            take = np.concatenate([[0], lens[bins[b]]])  # 0 = a plain move
            delta = give[:, None] - take[None, :]
            score = np.where((delta > 0) & (delta < gap), np.abs(2 * delta - gap), np.iinfo(np.int64).max)
            best = int(np.argmin(score))
            if score.flat[best] == np.iinfo(np.int64).max:
                continue
            gi, ti = divmod(best, take.size)
            moved = bins[a].pop(gi)
            bins[b].append(moved)
            if ti > 0:
                back = bins[b].pop(ti - 1)
                bins[a].append(back)
            d = int(delta[gi, ti])
            loads[a] -= d
            loads[b] += d
            break
        else:
            return


def _deal_to_ranks(bins: list[list[int]], loads: np.ndarray, n_ranks: int) -> list[list[list[int]]]:
    per_rank = len(bins) // n_ranks
    ranks: list[list[list[int]]] = [[] for _ in range(n_ranks)]
    heap = [(0, r) for r in range(n_ranks)]
    for b in np.argsort(-loads, kind="stable").tolist():
        total, r = heapq.heappop(heap)
        ranks[r].append(sorted(bins[b]))
        if len(ranks[r]) < per_rank:
            heapq.heappush(heap, (total + int(loads[b]), r))
    return ranks


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _validate(lengths: Sequence[int] | np.ndarray, max_tokens: int, n_ranks: int) -> np.ndarray:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise AllocationError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if isinstance(n_ranks, bool) or not isinstance(n_ranks, (int, np.integer)) or n_ranks < 1:
        raise AllocationError(f"n_ranks must be a positive integer, got {n_ranks!r}")
    if hasattr(lengths, "numpy") and hasattr(lengths, "cpu"):  # a torch tensor
        lengths = lengths.cpu().numpy()
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise AllocationError(f"lengths must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
        raise AllocationError(f"lengths must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and int(arr.min()) < 1:
        i = int(np.argmin(arr))
        raise AllocationError(f"sequence {i} has length {int(arr[i])}; lengths must be >= 1")
    over = np.flatnonzero(arr > max_tokens)
    if over.size:
        i = int(over[0])
        listed = ", ".join(str(int(j)) for j in over[:10]) + (", ..." if over.size > 10 else "")
        raise AllocationError(
            f"sequence {i} has {int(arr[i])} tokens, more than max_tokens={max_tokens} "
            f"({over.size} sequence(s) over the budget: {listed})"
        )
    return arr
