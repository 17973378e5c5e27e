"""Critic-free returns and advantages for packed sequences (GAE with zero values).

A sequence's response is its loss-mask tokens, in order. The sequence reward lands on the last
response token; an optional KL penalty -kl_coef * KL_t lands on every response token. With values
all zero, GAE's delta_t is the reward r_t, so A_t = sum_l (gamma * lam)^l r_{t+l} and the return
equals the advantage; with gamma = lam = 1 every response token gets the sequence reward.

Normalisation (`normalize`): "batch" (True; boba) takes mean/std over all response tokens of the batch;
"group" (GRPO) over the sequences answering the same prompt (`group_ids`), one value per sequence
(its return: the advantage of its first response token), so a long response weighs as much as a
short one in its group's statistics; "none" (False) leaves the advantages as they are.

`ppo.advantage` picks the estimator; boba's is the above (its normalisation `ppo.normalize_advantages`).
The others work on the same returns, with a group's statistics over its sequences' returns
(`group_advantages`): grpo (DeepSeekMath, arXiv 2402.03300): (R - mean_g) / (std_g + eps), the "group"
normalisation (std biased here; TRL and verl take Bessel's); dr_grpo (arXiv 2503.20783): R - mean_g,
no std; rloo (Ahmadian et al. 2402.14740, TRL RLOO): R_i minus the mean of the group's other samples,
= n/(n-1) (R_i - mean_g); reinforce_pp (REINFORCE++-baseline, arXiv 2501.03262, verl's
reinforce_plus_plus_baseline): R - mean_g, then mean/std over all response tokens of the batch
(boba without the group baseline is REINFORCE++ itself).
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


def _group_stats(adv: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, group_ids: Tensor,
                 seq_weights: Tensor | None = None):
    """For the response tokens: positions, and their group's size, mean and std (biased) of the
    sequences' returns (each sequence's first response-token advantage). ``seq_weights``: each sequence's
    share of its trajectory (1 / its segments, actors.rollout), so a group's statistics count trajectories."""
    group_ids = group_ids.to(adv.device)
    if group_ids.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"group_ids: expected {cu_seqlens.numel() - 1} sequence group ids, got {group_ids.numel()}")
    pos, seq, rank, counts = response_layout(loss_mask, cu_seqlens)
    if pos.numel() == 0:
        return pos, None, None, None
    _, gidx = torch.unique(group_ids, return_inverse=True)          # [S] dense group index
    n_groups = int(gidx.max()) + 1
    first = rank == 0
    returns = adv[pos[first]].double()
    g_of = gidx[seq[first]]
    w = torch.ones_like(returns) if seq_weights is None else seq_weights.to(adv.device).double()[seq[first]]
    n = torch.zeros(n_groups, dtype=torch.float64, device=adv.device).index_add_(0, g_of, w)
    mean = torch.zeros_like(n).index_add_(0, g_of, returns * w) / n.clamp(min=1e-12)
    var = torch.zeros_like(n).index_add_(0, g_of, w * (returns - mean[g_of]).pow(2)) / n.clamp(min=1e-12)
    tok_g = gidx[seq]
    return pos, n[tok_g], mean[tok_g], var.sqrt()[tok_g]


def normalize_groups(adv: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, group_ids: Tensor,
                     eps: float = NORM_EPS, seq_weights: Tensor | None = None) -> Tensor:
    """(A - mean_g) / (std_g + eps) on response tokens, with a group's mean/std (biased) over its
    sequences' returns (each sequence's first response-token advantage); 0 elsewhere."""
    return group_advantages(adv, loss_mask, cu_seqlens, group_ids, "grpo", eps, seq_weights)


GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
ESTIMATORS = ("boba", *GROUP_ESTIMATORS)


def group_advantages(adv: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, group_ids: Tensor | None, mode: str,
                     eps: float = NORM_EPS, seq_weights: Tensor | None = None) -> Tensor:
    """Returns `adv` [T] turned into `mode`'s advantages against their group (module doc); 0 off the mask."""
    if mode not in GROUP_ESTIMATORS:
        raise ValueError(f"advantage={mode!r}: must be one of {', '.join(ESTIMATORS)}")
    if group_ids is None:
        raise ValueError(f"advantage={mode!r}: needs the batch's group_ids (which prompt each sequence answers)")
    out = torch.zeros(adv.numel(), dtype=torch.float32, device=adv.device)
    pos, n, mean, std = _group_stats(adv, loss_mask, cu_seqlens, group_ids, seq_weights)
    if pos.numel() == 0:
        return out
    centred = adv[pos].double() - mean
    if mode == "grpo":
        centred = centred / (std + eps)
    elif mode == "rloo":
        centred = torch.where(n > 1, centred * n / (n - 1).clamp(min=1), 0.0)
    out[pos] = centred.float()
    if mode == "reinforce_pp":
        out = normalize_masked(out, loss_mask, eps)
    return out


NORMALIZE = {True: "batch", False: "none", "batch": "batch", "group": "group", "none": "none"}


def _mode(normalize: bool | str, group_ids: Tensor | None) -> str:
    mode = NORMALIZE.get(normalize) if isinstance(normalize, (bool, str)) else None
    if mode is None:
        raise ValueError(f"normalize={normalize!r}: must be batch, group, none (or True / False)")
    if mode == "group" and group_ids is None:
        raise ValueError("normalize='group': needs the batch's group_ids (which prompt each sequence answers)")
    return mode


def normalize_advantages(adv: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, normalize: bool | str = True,
                         group_ids: Tensor | None = None, seq_weights: Tensor | None = None) -> Tensor:
    """Raw advantages (``advantages_for(..., normalize="none")``) normalised as ``normalize`` asks (module doc):
    a caller that reports the raw ones and trains on the normalised ones computes them once."""
    mode = _mode(normalize, group_ids)
    if mode == "batch":
        return normalize_masked(adv, loss_mask)
    if mode == "group":
        return normalize_groups(adv, loss_mask, cu_seqlens, group_ids, seq_weights=seq_weights)
    return adv


def advantages_for(seq_rewards: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, *, gamma: float = 1.0,
                   lam: float = 1.0, normalize: bool | str = True, logprobs: Tensor | None = None,
                   ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k1",
                   group_ids: Tensor | None = None) -> Tensor:
    """Advantages [T] of a whole batch, normalised over the batch or per group when asked (module doc)."""
    _mode(normalize, group_ids)  # a bad setting fails before any work
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


def estimate_advantages(raw: Tensor, loss_mask: Tensor, cu_seqlens: Tensor, estimator: str = "boba",
                        normalize: bool | str = True, group_ids: Tensor | None = None,
                        seq_weights: Tensor | None = None) -> Tensor:
    """`ppo.advantage` on raw returns (``advantages_for(..., normalize="none")``): boba's normalisation
    as ``normalize`` asks, or a group estimator (module doc); ``seq_weights``: see ``_group_stats``."""
    if estimator == "boba":
        return normalize_advantages(raw, loss_mask, cu_seqlens, normalize, group_ids, seq_weights)
    return group_advantages(raw, loss_mask, cu_seqlens, group_ids, estimator, seq_weights=seq_weights)
