"""Train/inference mismatch corrections: how the weight rho = pi_prox / pi_behav enters the loss (`ppo.mismatch`).

pi_behav is the generator's own logprob of each token, pi_prox the learner's recomputed one (the
proximal policy of the decoupled objective; with recompute off they are equal and rho = 1). Each mode
returns a weight per token and the tokens that stay in the loss (and in its normaliser):
- none (boba, AReaL's decoupled PPO): weight rho; tokens with rho > `behaviour_imp_cap` get weight 0
  and stay in the normaliser;
- tis, truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
  off-policy RL training"; verl rollout_is): weight min(rho, C); nothing dropped;
- mis, masked importance sampling (verl rollout_rs / slime MIS after slime#657): a token (or sequence)
  with rho outside [low, C] leaves the loss and its normaliser (rejection); the rest keep weight rho;
- icepop (Ant Group's Ring-1T IcePop; slime / AReaL): weight rho inside [low, C], 0 outside, masked
  tokens stay in the normaliser (the paper's 1/sum|o_i|).
At `level: sequence` rho is the sequence's product of token ratios (verl's "sequence" mode), applied
to each of its tokens. C is `mismatch_threshold` (default 2.0, verl's), low `mismatch_threshold_low`
(default 1/C).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

MISMATCH = ("none", "tis", "mis", "icepop")
LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: a sequence's product of ratios stays finite


def sequence_sum(x: Tensor, loss_mask: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Each token gets the sum of `x` over its sequence's loss tokens ([T]; 0 off the mask)."""
    mask = loss_mask.bool()
    cu = cu_seqlens.long()
    csum = torch.cat([x.new_zeros(1, dtype=torch.float64), torch.where(mask, x.double(), 0.0).cumsum(0)])
    per_seq = csum[cu[1:]] - csum[cu[:-1]]
    seq_of = torch.repeat_interleave(torch.arange(per_seq.numel(), device=x.device), cu[1:] - cu[:-1])
    return torch.where(mask, per_seq[seq_of], 0.0)


def mismatch_weights(proximal_logprobs: Tensor, behaviour_logprobs: Tensor, loss_mask: Tensor,
                     cu_seqlens: Tensor, *, mode: str = "none", level: str = "token", threshold: float = 2.0,
                     threshold_low: float | None = None, cap: float | None = None) -> tuple[Tensor, Tensor]:
    """(weights [T] float32, 0 off the mask; the loss mask that remains [T] bool), module doc."""
    mask = loss_mask.bool()
    if mode == "none":  # boba's decoupled weight: token level, its own cap (float32, as it always was)
        rho = (proximal_logprobs.detach().float() - behaviour_logprobs.detach().float()).exp()
        keep_w = mask if cap is None else mask & (rho <= cap)
        return torch.where(keep_w, rho, 0.0), mask
    log_rho = torch.where(mask, proximal_logprobs.detach().double() - behaviour_logprobs.detach().double(), 0.0)
    if mode not in MISMATCH:
        raise ValueError(f"mismatch={mode!r}: must be one of {', '.join(MISMATCH)}")
    if level == "sequence":
        log_rho = sequence_sum(log_rho, mask, cu_seqlens)
    elif level != "token":
        raise ValueError(f"mismatch_level={level!r}: must be 'token' or 'sequence'")
    log_rho = log_rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    rho = log_rho.exp()
    low = 1.0 / threshold if threshold_low is None else threshold_low
    if mode == "tis":
        return torch.where(mask, rho.clamp(max=threshold), 0.0).float(), mask
    inside = mask & (log_rho <= math.log(threshold))
    if low > 0:
        inside &= log_rho >= math.log(low)
    w = torch.where(inside, rho, 0.0).float()
    return (w, inside) if mode == "mis" else (w, mask)
