"""Synthetic PPO batches for the training-step tests: random tokens, a short prompt, loss on the response."""
from __future__ import annotations

from typing import Callable

import torch

from tensors.packed import PackedBatch


def synthetic_batch(n_seqs: int, seed: int, response_len: Callable[[int], int],
                    reward: Callable[[int], float]) -> PackedBatch:
    """Sequence i: a prompt of 3 + i % 4 tokens, `response_len(i)` response tokens (the loss mask), behaviour
    logprobs 0, version 0 on the response, `reward(i)`, group i // 2 (pairs answer one prompt)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n_seqs):
        p, r = 3 + i % 4, response_len(i)
        mask = torch.cat([torch.zeros(p, dtype=torch.bool), torch.ones(r, dtype=torch.bool)])
        seqs.append(dict(input_ids=torch.randint(0, 49152, (p + r,), generator=g), loss_mask=mask,
                         logprobs=torch.zeros(p + r), versions=torch.where(mask, 0, -1),
                         rewards=reward(i), group_ids=i // 2))
    return PackedBatch.from_sequences(seqs)


def with_behaviour_logprobs(batch: PackedBatch, logprobs: torch.Tensor) -> PackedBatch:
    """`batch` whose generator logprobs are `logprobs` on response tokens, 0 on prompt tokens."""
    return batch.with_fields(tokens={"logprobs": torch.where(batch.loss_mask, logprobs, 0.0)})
