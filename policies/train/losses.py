"""PPO (with the decoupled objective for stale data) and SFT losses on per-token tensors.

Losses are token-level: a sum over loss tokens divided by `normalizer`, the number of loss tokens of
the whole (mini)batch, so micro-batch losses add up to the minibatch loss and long responses weigh
per token, not per sequence. Stats are sums over loss tokens, so callers can add them across micro-batches.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _normalizer(loss_mask: Tensor, normalizer: float | int | None) -> float:
    if normalizer is None:
        return max(int(loss_mask.sum()), 1)
    if normalizer <= 0:
        raise ValueError(f"normalizer={normalizer}: must be > 0")
    return float(normalizer)


def ppo_loss(logprobs: Tensor, proximal_logprobs: Tensor, behaviour_logprobs: Tensor, advantages: Tensor,
             loss_mask: Tensor, *, eps_clip: float = 0.2, dual_clip: float | None = None,
             behaviour_imp_cap: float | None = None, normalizer: float | int | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled clipped surrogate (AReaL): the ratio pi/pi_prox is clipped to [1-eps, 1+eps] and the
    per-token loss is weighted by the behaviour importance weight pi_prox/pi_behav; tokens whose weight
    exceeds `behaviour_imp_cap` are dropped (weight 0). When pi_prox == pi_behav it is standard PPO.
    Dual clip (c > 1) bounds the loss of negative-advantage tokens by -c * A."""
    mask = loss_mask.bool()
    adv = advantages.detach().float()
    prox = proximal_logprobs.detach().float()
    ratio = torch.where(mask, torch.exp(logprobs.float() - prox), 0.0)
    clipped_ratio = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip)
    loss_unclipped, loss_clipped = -adv * ratio, -adv * clipped_ratio
    pg = torch.maximum(loss_unclipped, loss_clipped)
    clip_mask = (loss_clipped > loss_unclipped).detach() & mask
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip={dual_clip}: must be > 1")
        bound = -dual_clip * adv
        dual_mask = (adv < 0) & (pg.detach() > bound) & mask
        pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)
    else:
        dual_mask = torch.zeros_like(mask)

    behav_log_w = (prox - behaviour_logprobs.detach().float())
    behav_w = behav_log_w.exp()
    keep = mask if behaviour_imp_cap is None else mask & (behav_w <= behaviour_imp_cap)
    behav_w = torch.where(keep, behav_w, 0.0)
    pg = pg * behav_w

    loss = torch.where(mask, pg, 0.0).sum() / _normalizer(mask, normalizer)
    with torch.no_grad():
        log_r = torch.where(mask, logprobs.detach().float() - prox, 0.0)
        stats = dict(
            n_tokens=mask.sum().float(),
            clipped=clip_mask.sum().float(),
            dual_clipped=dual_mask.sum().float(),
            # k3 estimate of KL(pi_prox || pi) from tokens near pi_prox: non-negative, 0 iff equal
            approx_kl=torch.where(mask, torch.expm1(-log_r) + log_r, 0.0).sum(),
            ratio=ratio.detach().sum(),
            behav_imp_weight=behav_w.sum(),
            behav_masked=(mask & ~keep).sum().float(),
        )
    return loss, stats


def sft_loss(logprobs: Tensor, loss_mask: Tensor, *, normalizer: float | int | None = None) -> Tensor:
    """Negative log-likelihood of the loss tokens, summed and divided by `normalizer`."""
    mask = loss_mask.bool()
    return -torch.where(mask, logprobs.float(), 0.0).sum() / _normalizer(mask, normalizer)
