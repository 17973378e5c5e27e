"""Critic-free returns and advantages for packed sequences (GAE with zero values).

A sequence's response is its loss-mask tokens, in order. The sequence reward lands on the last
response token; an optional KL penalty -kl_coef * KL_t lands on every response token. With values
all zero, GAE's delta_t is the reward r_t, so A_t = sum_l (gamma * lam)^l r_{t+l} and the return
equals the advantage; with gamma = lam = 1 every response token gets the sequence reward.

Normalisation (`normalize`): "batch" (True; boba) takes mean/std over all response tokens of the batch;
"group" (GRPO) over the sequences answering the same prompt (`group_ids`), one value per sequence
(its return: the advantage of its first response token), so a long response weighs as much as a
short one in its group's statistics; "none" (False) leaves the advantages as they are.
"""
from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-5


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi (Schulman's k1 / k3)."""
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":  # unbiased and non-negative: (r - 1) - log r with r = pi_ref / pi
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimator={estimator!r}: must be 'k1' or 'k3'")


def response_layout(loss_mask: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For the response tokens: their positions, sequence ids and ranks within their sequence,
    plus the number of response tokens of each sequence."""
    cu = cu_seqlens.long()
    mask = loss_mask.bool()
    csum = torch.cat([mask.new_zeros(1, dtype=torch.long), mask.long().cumsum(0)])
    counts = csum[cu[1:]] - csum[cu[:-1]]
    pos = mask.nonzero().squeeze(-1)
    seq = torch.searchsorted(cu, pos, right=True) - 1
    rank = csum[pos] - csum[cu[:-1]][seq]
    return pos, seq, rank, counts


def token_rewards(seq_rewards: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, *, kl: Tensor | None = None,
                  kl_coef: float = 0.0) -> Tensor:
    """Per-token rewards [T]: -kl_coef * kl on response tokens, plus the sequence reward on the last one."""
    mask = loss_mask.bool()
    out = torch.zeros(mask.numel(), dtype=torch.float32, device=mask.device)
    if kl is not None and kl_coef != 0.0:
        out = torch.where(mask, -kl_coef * kl.float(), out)
    pos, seq, rank, counts = response_layout(mask, cu_seqlens)
    last = pos[rank == counts[seq] - 1]
    has_response = counts > 0
    out[last] += seq_rewards.float().to(out.device)[has_response]
    return out


def gae_advantages(rewards: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, *, gamma: float = 1.0,
                   lam: float = 1.0) -> Tensor:
    """GAE with zero values over each sequence's response tokens; 0 elsewhere. Returns [T] float32."""
    pos, seq, rank, counts = response_layout(loss_mask, cu_seqlens)
    num_seqs, width = counts.numel(), int(counts.max()) if counts.numel() else 0
    grid = torch.zeros(num_seqs, width, dtype=torch.float64, device=rewards.device)
    grid[seq, rank] = rewards[pos].double()
    discount = gamma * lam
    if discount == 1.0:
        adv = grid.flip(1).cumsum(1).flip(1)
    else:  # A_t = r_t + discount * A_{t+1}; padding (zeros) after the end keeps A_end = r_end
        adv = torch.zeros_like(grid)
        running = torch.zeros(num_seqs, dtype=torch.float64, device=rewards.device)
        for t in range(width - 1, -1, -1):
            running = grid[:, t] + discount * running
            adv[:, t] = running
    out = torch.zeros(rewards.numel(), dtype=torch.float32, device=rewards.device)
    out[pos] = adv[seq, rank].float()
    return out


def normalize_masked(x: Tensor, mask: Tensor, eps: float = NORM_EPS) -> Tensor:
    """(x - mean) / (std + eps) over the masked entries (biased std); 0 elsewhere."""
    mask = mask.bool()
    n = int(mask.sum())
    if n == 0:
        return torch.zeros_like(x, dtype=torch.float32)
    vals = x[mask].double()
    mean = vals.mean()
    std = (vals - mean).pow(2).mean().sqrt()
    return torch.where(mask, (x.double() - mean) / (std + eps), 0.0).float()


def normalize_groups(adv: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, group_ids: Tensor,
                     eps: float = NORM_EPS) -> Tensor:
    """(A - mean_g) / (std_g + eps) on response tokens, with a group's mean/std (biased) over its
    sequences' returns (each sequence's first response-token advantage); 0 elsewhere."""
    group_ids = group_ids.to(adv.device)
    if group_ids.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"group_ids: expected {cu_seqlens.numel() - 1} sequence group ids, got {group_ids.numel()}")
    pos, seq, rank, counts = response_layout(loss_mask, cu_seqlens)
    out = torch.zeros(adv.numel(), dtype=torch.float32, device=adv.device)
    if pos.numel() == 0:
        return out
    _, gidx = torch.unique(group_ids, return_inverse=True)          # [S] dense group index
    n_groups = int(gidx.max()) + 1
    first = rank == 0
    returns = adv[pos[first]].double()
    g_of = gidx[seq[first]]
    n = torch.zeros(n_groups, dtype=torch.float64, device=adv.device).index_add_(0, g_of, torch.ones_like(returns))
    mean = torch.zeros_like(n).index_add_(0, g_of, returns) / n.clamp(min=1)
    var = torch.zeros_like(n).index_add_(0, g_of, (returns - mean[g_of]).pow(2)) / n.clamp(min=1)
    tok_g = gidx[seq]
    out[pos] = ((adv[pos].double() - mean[tok_g]) / (var.sqrt()[tok_g] + eps)).float()
    return out


NORMALIZE = {True: "batch", False: "none", "batch": "batch", "group": "group", "none": "none"}


def advantages_for(seq_rewards: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, *, gamma: float = 1.0,
                   lam: float = 1.0, normalize: bool | str = True, logprobs: Tensor | None = None,
                   ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k1",
                   group_ids: Tensor | None = None) -> Tensor:
    """Advantages [T] of a whole batch, normalised over the batch or per group when asked (module doc)."""
    _mode(normalize, group_ids)
    if seq_rewards.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"rewards: expected {cu_seqlens.numel() - 1} sequence rewards, got {seq_rewards.numel()}")
    if loss_mask.numel() != int(cu_seqlens[-1]):
        raise ValueError(f"loss_mask: expected {int(cu_seqlens[-1])} tokens, got {loss_mask.numel()}")
    kl = None
    if kl_coef != 0.0:
        if ref_logprobs is None or logprobs is None:
            raise ValueError(f"kl_coef={kl_coef}: a KL penalty needs both logprobs and ref_logprobs")
        kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)
    rewards = token_rewards(seq_rewards, loss_mask, cu_seqlens, kl=kl, kl_coef=kl_coef)
    adv = gae_advantages(rewards, loss_mask, cu_seqlens, gamma=gamma, lam=lam)
    return normalize_advantages(adv, loss_mask, cu_seqlens, normalize, group_ids)


def _mode(normalize: bool | str, group_ids: Tensor | None) -> str:
    mode = NORMALIZE.get(normalize) if isinstance(normalize, (bool, str)) else None
    if mode is None:
        raise ValueError(f"normalize={normalize!r}: must be batch, group, none (or True / False)")
    if mode == "group" and group_ids is None:
        raise ValueError("normalize='group': needs the batch's group_ids (which prompt each sequence answers)")
    return mode


def normalize_advantages(adv: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, normalize: bool | str = True,
                         group_ids: Tensor | None = None) -> Tensor:
    """Unnormalised advantages [T] normalised as `normalize` says (batch, group, none; True / False)."""
    mode = _mode(normalize, group_ids)
    if mode == "batch":
        return normalize_masked(adv, loss_mask)
    if mode == "group":
        return normalize_groups(adv, loss_mask, cu_seqlens, group_ids)
    return adv
