"""Policy losses (boba's decoupled PPO, GSPO, CISPO) and the SFT loss on per-token tensors.

Each policy loss takes the per-token weights of `ppo.mismatch` (`imp_weights`, policies.train.mismatch;
default boba's decoupled weight from `behaviour_logprobs` and `behaviour_imp_cap`) and adds up its
per-token losses either as boba does (a sum over loss tokens divided by `normalizer`, the number of
loss tokens of the whole (mini)batch, so micro-batch losses add up to the minibatch loss) or with
`token_weights` (policies.train.aggregation, `ppo.loss_agg`). Stats are sums over loss tokens, so
callers can add them across micro-batches.
"""
from __future__ import annotations

import torch
from torch import Tensor

from policies.train.mismatch import sequence_sum


def _normalizer(loss_mask: Tensor, normalizer: float | int | None) -> float:
    if normalizer is None:
        return max(int(loss_mask.sum()), 1)
    if normalizer <= 0:
        raise ValueError(f"normalizer={normalizer}: must be > 0")
    return float(normalizer)


def _reduce(per_token: Tensor, mask: Tensor, normalizer: float | int | None, token_weights: Tensor | None) -> Tensor:
    if token_weights is not None:
        return torch.where(mask, per_token * token_weights.detach().float(), 0.0).sum()
    return torch.where(mask, per_token, 0.0).sum() / _normalizer(mask, normalizer)


def _imp_weights(mask: Tensor, prox: Tensor, behaviour_logprobs: Tensor | None, cap: float | None,
                 imp_weights: Tensor | None) -> Tensor:
    """Per-token importance weights: the caller's, else pi_prox/pi_behav with tokens above `cap` at 0."""
    if imp_weights is not None:
        return torch.where(mask, imp_weights.detach().float(), 0.0)
    if behaviour_logprobs is None:
        return mask.float()
    w = (prox - behaviour_logprobs.detach().float()).exp()
    keep = mask if cap is None else mask & (w <= cap)
    return torch.where(keep, w, 0.0)


def _stats(mask: Tensor, log_r: Tensor, ratio: Tensor, clipped: Tensor, dual: Tensor, w: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        log_r = torch.where(mask, log_r.detach(), 0.0)
        return dict(
            n_tokens=mask.sum().float(),
            clipped=(clipped & mask).sum().float(),
            dual_clipped=(dual & mask).sum().float(),
            # k3 estimate of KL(pi_prox || pi) from tokens near pi_prox: non-negative, 0 iff equal
            approx_kl=torch.where(mask, torch.expm1(-log_r) + log_r, 0.0).sum(),
            ratio=torch.where(mask, ratio.detach(), 0.0).sum(),
            behav_imp_weight=w.sum(),
            behav_masked=(mask & (w == 0)).sum().float(),
        )


def ppo_loss(logprobs: Tensor, proximal_logprobs: Tensor, behaviour_logprobs: Tensor | None, advantages: Tensor,
             loss_mask: Tensor, *, eps_clip: float = 0.2, eps_clip_high: float | None = None,
             dual_clip: float | None = None, behaviour_imp_cap: float | None = None,
             normalizer: float | int | None = None, imp_weights: Tensor | None = None,
             token_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled clipped surrogate (AReaL): the ratio pi/pi_prox is clipped to [1-eps, 1+eps_high]
    (eps_high defaults to eps; DAPO's clip-higher sets it apart) and the per-token loss is weighted by
    the behaviour importance weight pi_prox/pi_behav; tokens whose weight exceeds `behaviour_imp_cap`
    are dropped (weight 0). When pi_prox == pi_behav it is standard PPO.
    Dual clip (c > 1) bounds the loss of negative-advantage tokens by -c * A."""
    mask = loss_mask.bool()
    adv = advantages.detach().float()
    prox = proximal_logprobs.detach().float()
    eps_high = eps_clip if eps_clip_high is None else eps_clip_high
    log_r = logprobs.float() - prox
    ratio = torch.where(mask, torch.exp(log_r), 0.0)
    clipped_ratio = ratio.clamp(1.0 - eps_clip, 1.0 + eps_high)
    loss_unclipped, loss_clipped = -adv * ratio, -adv * clipped_ratio
    pg = torch.maximum(loss_unclipped, loss_clipped)
    clip_mask = (loss_clipped > loss_unclipped).detach()
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip={dual_clip}: must be > 1")
        bound = -dual_clip * adv
        dual_mask = (adv < 0) & (pg.detach() > bound)
        pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)
    else:
        dual_mask = torch.zeros_like(mask)
    w = _imp_weights(mask, prox, behaviour_logprobs, behaviour_imp_cap, imp_weights)
    loss = _reduce(pg * w, mask, normalizer, token_weights)
    return loss, _stats(mask, log_r, ratio, clip_mask, dual_mask, w)


def gspo_loss(logprobs: Tensor, proximal_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor,
              cu_seqlens: Tensor, *, eps_clip_low: float = 3e-4, eps_clip_high: float = 4e-4,
              normalizer: float | int | None = None, imp_weights: Tensor | None = None,
              token_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (arXiv 2507.18071): one ratio per sequence, s_i = exp(mean_t log(pi/pi_prox)), clipped to
    [1-eps_low, 1+eps_high] as PPO clips a token's. Written per token as verl's compute_policy_loss_gspo
    (GSPO-token): s_i,t = sg(s_i) * pi_t / sg(pi_t), equal to s_i in value, whose gradient with
    seq_mean_token_mean aggregation is the paper's. Sequences never span micro-batches, so `cu_seqlens`
    (of these tokens) holds whole sequences."""
    mask = loss_mask.bool()
    adv = advantages.detach().float()
    lp = logprobs.float()
    log_r = lp - proximal_logprobs.detach().float()
    n = sequence_sum(mask.float(), mask, cu_seqlens).clamp(min=1)
    log_s = (sequence_sum(log_r.detach(), mask, cu_seqlens) / n).float()
    log_s_tok = torch.where(mask, (lp - lp.detach() + log_s).clamp(max=10.0), 0.0)  # verl's clamp
    s = torch.where(mask, log_s_tok.exp(), 0.0)
    loss_unclipped, loss_clipped = -adv * s, -adv * s.clamp(1.0 - eps_clip_low, 1.0 + eps_clip_high)
    pg = torch.maximum(loss_unclipped, loss_clipped)
    w = _imp_weights(mask, None, None, None, imp_weights)
    loss = _reduce(pg * w, mask, normalizer, token_weights)
    return loss, _stats(mask, log_r, s, (loss_clipped > loss_unclipped).detach(), torch.zeros_like(mask), w)


def cispo_loss(logprobs: Tensor, proximal_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor, *,
               eps_clip_low: float = 1.0, eps_clip_high: float = 0.28, normalizer: float | int | None = None,
               imp_weights: Tensor | None = None, token_weights: Tensor | None = None
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4): -sg(clip(r, 1-eps_low, 1+eps_high)) * A * log pi per
    token: the importance weight is clipped, never the token's gradient, so a rare token past the clip
    still learns. MiniMax sets no lower bound (eps_low 1: clip below at 0)."""
    mask = loss_mask.bool()
    adv = advantages.detach().float()
    lp = logprobs.float()
    log_r = lp - proximal_logprobs.detach().float()
    ratio = torch.where(mask, log_r.detach().exp(), 0.0)
    r_hat = ratio.clamp(1.0 - eps_clip_low, 1.0 + eps_clip_high)
    pg = -r_hat * adv * lp
    w = _imp_weights(mask, None, None, None, imp_weights)
    loss = _reduce(pg * w, mask, normalizer, token_weights)
    return loss, _stats(mask, log_r, ratio, r_hat != ratio, torch.zeros_like(mask), w)


def sft_loss(logprobs: Tensor, loss_mask: Tensor, *, normalizer: float | int | None = None) -> Tensor:
    """Negative log-likelihood of the loss tokens, summed and divided by `normalizer`."""
    mask = loss_mask.bool()
    return -torch.where(mask, logprobs.float(), 0.0).sum() / _normalizer(mask, normalizer)
