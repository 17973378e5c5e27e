"""Which problems make up training batch b: a pure function of (seed, dataset size, b).

Because the order is a function and not a cursor, resuming at step k replays exactly the batches
k, k+1, ... that an uninterrupted run would have seen, and the sampler's whole state is one integer.
"""
from __future__ import annotations

import numpy as np


def epoch_permutation(n_problems: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_problems)


def batch_indices(n_problems: int, batch_size: int, seed: int, batch: int) -> list[int]:
    """Dataset indices of batch ``batch``; batches run on across epoch boundaries."""
    if n_problems <= 0:
        raise ValueError("the dataset is empty")
    start = batch * batch_size
    out: list[int] = []
    perm_epoch, perm = -1, None
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, n_problems)
        if epoch != perm_epoch:
            perm_epoch, perm = epoch, epoch_permutation(n_problems, seed, epoch)
        out.append(int(perm[offset]))
    return out
