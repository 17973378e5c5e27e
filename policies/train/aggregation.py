"""How per-token losses add up to a minibatch's loss (`ppo.loss_agg`), as per-token weights.

Every mode is a weight per loss token, computed over the whole minibatch before it is split into
micro-batches, so micro-batch losses still add up to the minibatch loss (and learner ranks still sum):
- token_mean (boba, DAPO): 1 / N, N the minibatch's loss tokens: a long response weighs per token;
- seq_mean_token_mean (GRPO as in DeepSeekMath / TRL loss_type="grpo", GSPO): 1 / (S * n_i), the
  mean over sequences of each sequence's token mean (S sequences with a loss token, n_i its tokens);
- seq_mean_token_sum: 1 / S, the mean over sequences of each sequence's token sum;
- seq_mean_token_sum_norm (Dr.GRPO, arXiv 2503.20783): 1 / (S * L), L a constant (the generation
  budget, `ppo.loss_agg_norm`), so neither the length nor the group's lengths rescale a token.
Names follow verl's `loss_agg_mode` (core_algos.agg_loss) with '_' for '-'.
"""
from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def token_weights(loss_mask: Tensor, cu_seqlens: Tensor, mode: str, norm_len: int | None = None) -> Tensor:
    """Per-token weights [T] (0 off the loss mask) whose dot product with per-token losses is the
    minibatch loss under `mode`; `norm_len` is seq_mean_token_sum_norm's constant (None: the longest
    response here)."""
    mask = loss_mask.bool()
    out = torch.zeros(mask.numel(), dtype=torch.float32, device=mask.device)
    cu = cu_seqlens.long()
    counts = (torch.cat([mask.new_zeros(1, dtype=torch.long), mask.long().cumsum(0)]))
    per_seq = counts[cu[1:]] - counts[cu[:-1]]  # loss tokens of each sequence
    n_seqs = int((per_seq > 0).sum())
    if n_seqs == 0:
        return out
    seq_of = torch.repeat_interleave(torch.arange(per_seq.numel(), device=mask.device), cu[1:] - cu[:-1])
    if mode == "token_mean":
        w = torch.full_like(out, 1.0 / int(per_seq.sum()))
    elif mode == "seq_mean_token_sum":
        w = torch.full_like(out, 1.0 / n_seqs)
    elif mode == "seq_mean_token_mean":
        w = 1.0 / (n_seqs * per_seq.clamp(min=1)[seq_of].double())
    elif mode == "seq_mean_token_sum_norm":
        length = int(per_seq.max()) if norm_len is None else norm_len
        if length <= 0:
            raise ValueError(f"loss_agg_norm={norm_len}: must be >= 1")
        w = torch.full_like(out, 1.0 / (n_seqs * length))
    else:
        raise ValueError(f"loss_agg={mode!r}: must be one of {', '.join(AGGREGATIONS)}")
    return torch.where(mask, w.float(), 0.0)
