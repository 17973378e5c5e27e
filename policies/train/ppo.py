"""PPO and SFT training steps on packed batches (the AReaL v0.2 "boba" recipe, critic-free).

One `train_step` consumes one rollout batch: advantages are computed (and normalised) over the whole
batch, the batch is split by sequence into `minibatches` optimiser steps, each minibatch into
micro-batches under a token budget whose gradients accumulate with the loss divided by the
minibatch's number of loss tokens. With a `world` of N learner ranks (policies.train.data_parallel) each
rank trains its share of every minibatch's micro-batches and the gradients are summed over ranks:
the same update as one rank.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from policies.train.advantages import advantages_for, estimate_advantages, kl_estimate
from policies.train.aggregation import token_weights
from policies.train.data_parallel import World, idle_forward, rank_share, zero_step
from policies.model.logprobs import check_packed, packed_logprobs
from policies.train.losses import cispo_loss, gspo_loss, ppo_loss, sft_loss  # noqa: F401  (re-exported)
from policies.train.mismatch import mismatch_weights
from policies.model.loading import assert_trainable
from policies.train.optim import clipped_step, make_optimizer  # noqa: F401  (make_optimizer re-exported)
from policies.model.precision import resolve_bf16
from policies.settings import Checked, at_least_one, non_negative, opt, positive
from policies.model.shared_prompts import prompt_lengths


def _in_unit(v) -> bool: return 0 <= v <= 1
def _above_one(v) -> bool: return v is None or v > 1


@dataclass
class PPOConfig(Checked):
    minibatches: int = opt(4, check=at_least_one, expect=">= 1", doc="PPO minibatches per training batch (release: 4)")
    lr: float = opt(2e-5, check=positive, expect="> 0")
    adam_eps: float = opt(1e-5, check=positive, expect="> 0")
    adam_betas: tuple[float, float] = opt((0.9, 0.999), check=lambda bs: all(0 <= b < 1 for b in bs),
                                          expect="in [0, 1)")
    weight_decay: float = opt(0.0, check=non_negative, expect=">= 0")
    eps_clip: float = opt(0.2, check=lambda v: 0 < v < 1, expect="in (0, 1)")
    dual_clip: float | None = opt(None, check=_above_one, expect="> 1")
    gamma: float = opt(1.0, check=_in_unit, expect="in [0, 1]")
    lam: float = opt(1.0, check=_in_unit, expect="in [0, 1]")
    kl_coef: float = opt(0.0, check=non_negative, expect=">= 0")
    kl_estimator: Literal["k1", "k3"] = "k1"
    normalize_advantages: bool | Literal["batch", "group", "none"] = opt(
        True, doc="batch (true): mean/std over all response tokens of the batch (boba); group: per prompt's "
                  "G samples (GRPO); none (false)")
    lr_schedule: Literal["constant", "linear", "cosine"] = opt(
        "constant", doc="decay after warm-up (policies.train.schedule)")
    warmup_steps: int = opt(0, check=non_negative, expect=">= 0", doc="RL steps of linear warm-up to lr")
    min_lr_ratio: float = opt(0.0, check=_in_unit, expect="in [0, 1]",
                              doc="linear/cosine decay ends at lr * min_lr_ratio")
    max_grad_norm: float = opt(1.0, check=positive, expect="> 0")
    max_tokens_per_micro_batch: int = opt(8192, check=at_least_one, expect=">= 1")
    behaviour_imp_cap: float | None = opt(5.0, check=_above_one, expect="> 1",
                                          doc="decoupled PPO: cap on pi_prox/pi_behav; tokens above are masked")
    temperature: float = opt(1.0, check=positive, expect="> 0",
                             doc="the generator's logits temperature, applied when recomputing logprobs")
    bf16: bool | Literal["auto"] = opt(False, doc="bf16 weights and compute, fp32 master weights in the optimiser; "
                                                  "auto: where bf16 is native (policies.model.precision)")
    compile: bool = opt(False, doc="torch.compile the decoder layers and the head math (policies.model.loading)")
    share_prompts: bool = opt(True, doc="the samples of a prompt run it through the model once "
                                        "(policies.model.shared_prompts)")
    gradient_checkpointing: bool = opt(False, doc="keep only each decoder layer's input; recompute the rest "
                                                  "in backward")
    recompute_logprobs: bool | Literal["auto"] = opt(
        "auto", doc="the learner recomputes the proximal logprobs before the minibatches; auto: unless the "
                    "generator's logprobs are already the learner's (actors.learner.recompute_needed)")
    # the recipe and the keys it fills where left null (policies.train.recipes; a key set here wins)
    recipe: Literal["boba", "grpo", "dr_grpo", "dapo", "gspo", "cispo"] = opt(
        "boba", doc="named preset: sets every key below left null, and rollout.dynamic_sampling / reward.overlong "
                    "(policies.train.recipes)")
    loss: Literal["ppo", "gspo", "cispo"] | None = opt(
        None, doc="ppo: token-ratio clipped surrogate (boba); gspo: sequence ratio; cispo: clipped stop-gradient "
                  "IS weight (policies.train.losses); null = the recipe's")
    eps_clip_low: float | None = opt(None, check=lambda v: v is None or 0 < v <= 1, expect="in (0, 1]",
                                     doc="ratio clipped below at 1 - this; null = the recipe's (boba: eps_clip)")
    eps_clip_high: float | None = opt(None, check=lambda v: v is None or v > 0, expect="> 0",
                                      doc="ratio clipped above at 1 + this (DAPO's clip-higher); null = the recipe's")
    loss_agg: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"] | None = \
        opt(None, doc="how token losses add up (policies.train.aggregation); null = the recipe's")
    loss_agg_norm: int | None = opt(None, check=at_least_one, expect=">= 1",
                                    doc="seq_mean_token_sum_norm's constant (Dr.GRPO); null = rollout.max_new_tokens "
                                        "(in-process: the longest response of the minibatch)")
    advantage: Literal["boba", "grpo", "dr_grpo", "rloo", "reinforce_pp"] | None = opt(
        None, doc="estimator (policies.train.advantages); normalize_advantages applies to boba's; null = the recipe's")
    mismatch: Literal["none", "tis", "mis", "icepop"] | None = opt(
        None, doc="train/inference mismatch correction on pi_prox/pi_behav (policies.train.mismatch); none: boba's "
                  "behaviour_imp_cap; null = the recipe's")
    mismatch_level: Literal["token", "sequence"] | None = opt(None, doc="null = the recipe's (token)")
    mismatch_threshold: float | None = opt(None, check=_above_one, expect="> 1",
                                           doc="C: tis truncates at it, mis / icepop mask above; null = the recipe's (2)")
    mismatch_threshold_low: float | None = opt(None, check=lambda v: v is None or 0 <= v < 1, expect="in [0, 1)",
                                               doc="mis / icepop mask below; null = 1 / mismatch_threshold")

    def check(self) -> None:
        from policies.train.recipes import ppo_values
        for key, value in ppo_values(self.recipe, self.eps_clip).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def effective(self) -> dict:
        """The recipe's keys as they stand (printed at launch)."""
        from policies.train.recipes import PPO_KEYS
        return {"recipe": self.recipe, **{k: getattr(self, k) for k in PPO_KEYS}}


@dataclass
class SFTConfig(Checked):
    lr: float = opt(1e-5, check=positive, expect="> 0", doc="learning rate")
    adam_eps: float = opt(1e-8, check=positive, expect="> 0")
    weight_decay: float = opt(0.0, check=non_negative, expect=">= 0")
    max_grad_norm: float = opt(1.0, check=positive, expect="> 0")
    max_tokens_per_micro_batch: int = opt(8192, check=at_least_one, expect=">= 1")
    epochs: int = opt(1, check=at_least_one, expect=">= 1", doc="passes over the data")
    batch_size: int = opt(16, check=at_least_one, expect=">= 1", doc="sequences per optimiser step")
    bf16: bool | Literal["auto"] = opt(False, doc="bf16 weights and compute, fp32 master weights in AdamW")
    compile: bool = opt(False, doc="torch.compile the decoder layers (slow first step)")


# ----------------------------------------------------------------------------- batch plumbing

def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_precision(optimizer, cfg, device: torch.device) -> None:
    if resolve_bf16(cfg.bf16, device) and not getattr(optimizer, "master_weights", False):
        raise ValueError(f"bf16={cfg.bf16!r}: the optimizer must come from make_optimizer(model, cfg), which casts "
                         "the model to bf16 and keeps fp32 master weights")


def _token_fields(batch, device: torch.device) -> dict[str, Tensor]:
    """The fields a step needs, on the model's device, checked against cu_seqlens."""
    f = dict(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens, loss_mask=batch.loss_mask,
             logprobs=batch.logprobs, rewards=batch.rewards)
    f = {k: v.to(device) for k, v in f.items()}
    check_packed(f["input_ids"], f["cu_seqlens"])
    num_tokens, num_seqs = f["input_ids"].numel(), f["cu_seqlens"].numel() - 1
    for name in ("loss_mask", "logprobs"):
        if f[name].shape != (num_tokens,):
            raise ValueError(f"batch.{name}: expected shape ({num_tokens},), got {tuple(f[name].shape)}")
    if f["rewards"].shape != (num_seqs,):
        raise ValueError(f"batch.rewards: expected shape ({num_seqs},), got {tuple(f['rewards'].shape)}")
    f["loss_mask"] = f["loss_mask"].bool()
    return f


def _check_token_tensor(name: str, t: Tensor | None, num_tokens: int, device: torch.device) -> Tensor | None:
    if t is None:
        return None
    if t.shape != (num_tokens,):
        raise ValueError(f"{name}: expected shape ({num_tokens},), got {tuple(t.shape)}")
    return t.to(device).float()


def gather_sequences(cu_seqlens: Tensor, seq_idx: Tensor | list[int]) -> tuple[Tensor, Tensor]:
    """Token positions of the chosen sequences (in the given order) and their new cu_seqlens."""
    cu = cu_seqlens.long()
    idx = torch.as_tensor(seq_idx, dtype=torch.long, device=cu.device)
    lengths = (cu[1:] - cu[:-1])[idx]
    new_cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    total = int(new_cu[-1])
    offsets = torch.arange(total, device=cu.device) - torch.repeat_interleave(new_cu[:-1], lengths)
    return torch.repeat_interleave(cu[:-1][idx], lengths) + offsets, new_cu.to(torch.int32)


def split_minibatches(num_seqs: int, minibatches: int) -> list[list[int]]:
    """Contiguous, in-order groups of sequences (at most `num_seqs` groups, sizes differ by <= 1)."""
    n = min(minibatches, num_seqs)
    return [chunk.tolist() for chunk in torch.arange(num_seqs).tensor_split(n)]


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Balanced micro-batches (lists of indices into `lengths`) from tensors.allocator."""
    from tensors.allocator import allocate_micro_batches  # imported late: only training needs it
    return allocate_micro_batches(lengths, max_tokens)[0]


def _plan(cu_seqlens: Tensor, seq_idx: list[int], max_tokens: int) -> list[list[int]]:
    """Micro-batches of the chosen sequences, as lists of original sequence indices."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    sub = [lengths[i] for i in seq_idx]
    return [[seq_idx[j] for j in mb] for mb in micro_batches(sub, max_tokens) if mb]


def _rank_plan(cu_seqlens: Tensor, seq_idx: list[int], max_tokens: int, world: World) -> list[list[int]]:
    """This rank's micro-batches of the chosen sequences (as many on every rank; [] = an empty one)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return [[seq_idx[j] for j in mb] for mb in rank_share([lengths[i] for i in seq_idx], max_tokens, world)]


# ----------------------------------------------------------------------------- PPO

# the per-token sums of ppo_loss's stats (and the micro-batch count) a step adds up over micro-batches and ranks
_SUMMED = ("n_tokens", "clipped", "dual_clipped", "approx_kl", "ratio", "behav_imp_weight", "behav_masked",
           "entropy", "n_micro")

def _group_ids(batch) -> Tensor | None:
    try:
        return batch.group_ids
    except (KeyError, AttributeError):
        return None


def _seq_weights(batch) -> Tensor | None:
    """Each sequence's share of its trajectory where a rollout worker's trajectory spans several sequences
    (actors.packer: ``seq_weights``); None: one sequence per sample."""
    return batch.seqs.get("seq_weights") if hasattr(batch, "seqs") else None


def _aggregation_weights(cfg: PPOConfig, train_mask: Tensor, pos: Tensor, cu: Tensor) -> Tensor | None:
    """The minibatch's per-token loss weights [T] (ppo.loss_agg); None for token_mean, which divides by
    the minibatch's loss tokens as boba always has."""
    if cfg.loss_agg == "token_mean":
        return None
    out = torch.zeros(train_mask.numel(), dtype=torch.float32, device=train_mask.device)
    out[pos] = token_weights(train_mask[pos], cu, cfg.loss_agg, cfg.loss_agg_norm)
    return out


def policy_loss(cfg: PPOConfig, logprobs: Tensor, prox: Tensor, adv: Tensor, mask: Tensor, cu_seqlens: Tensor,
                imp_weights: Tensor, *, normalizer: int, token_weights: Tensor | None) -> tuple[Tensor, dict]:
    """`cfg.loss` on one micro-batch (policies.train.losses)."""
    common = dict(normalizer=normalizer, imp_weights=imp_weights, token_weights=token_weights)
    if cfg.loss == "gspo":
        return gspo_loss(logprobs, prox, adv, mask, cu_seqlens, eps_clip_low=cfg.eps_clip_low,
                         eps_clip_high=cfg.eps_clip_high, **common)
    if cfg.loss == "cispo":
        return cispo_loss(logprobs, prox, adv, mask, eps_clip_low=cfg.eps_clip_low,
                          eps_clip_high=cfg.eps_clip_high, **common)
    return ppo_loss(logprobs, prox, None, adv, mask, eps_clip=cfg.eps_clip_low, eps_clip_high=cfg.eps_clip_high,
                    dual_clip=cfg.dual_clip, **common)


@torch.no_grad()
def recompute_logprobs(model: nn.Module, batch, cfg: PPOConfig, *, loss_tokens_only: bool = False,
                       world: World | None = None) -> Tensor:
    """Logprobs [T] of the batch under the current weights (the proximal policy), micro-batched;
    with `loss_tokens_only`, 0 outside batch.loss_mask (all that PPO reads of them). With a `world`
    of ranks each computes its share and every rank gets the whole."""
    device = _device(model)
    ids, cu = batch.input_ids.to(device), batch.cu_seqlens.to(device)
    check_packed(ids, cu)
    loss_mask = batch.loss_mask.to(device).bool()
    only = loss_mask if loss_tokens_only else None
    was_training = model.training
    model.eval()
    out = torch.zeros(ids.numel(), dtype=torch.float32, device=device)
    try:
        seqs = list(range(cu.numel() - 1))
        plan = _plan(cu, seqs, cfg.max_tokens_per_micro_batch) if world is None else \
            _rank_plan(cu, seqs, cfg.max_tokens_per_micro_batch, world)
        # the world's model is sharded: every rank runs it as often as the others (an empty slot too)
        sharded = world is not None and model is world.model
        forward = world.forward if sharded else functools.partial(packed_logprobs, model)
        for mb in plan:
            if not mb:
                if sharded:
                    idle_forward(world, ids)
                continue
            pos, mb_cu = gather_sequences(cu, mb)
            lp, _ = forward(ids[pos], mb_cu, temperature=cfg.temperature,
                                    only=None if only is None else only[pos],
                                    prompt_lens=prompt_lengths(loss_mask[pos], mb_cu) if cfg.share_prompts else None)
            out[pos] = lp.float()
    finally:
        model.train(was_training)
    return out if world is None else world.sum(out)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, cfg: PPOConfig, *,
               proximal_logprobs: Tensor | None = None, ref_logprobs: Tensor | None = None,
               lr: float | None = None, world: World | None = None) -> dict[str, float]:
    """One PPO training batch: `cfg.minibatches` optimiser steps. Without `proximal_logprobs` the
    behaviour logprobs serve as proximal ones (on-policy data: standard PPO). `lr` (policies.train.schedule)
    sets every parameter group's learning rate first. `world`: this rank's place among the learner
    ranks (every rank passes the whole batch and gets the same metrics); default one rank."""
    assert_trainable(model)
    device = _device(model)
    _check_precision(optimizer, cfg, device)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
    f = _token_fields(batch, device)
    groups = _group_ids(batch)
    groups = None if groups is None else groups.to(device)
    num_tokens = f["input_ids"].numel()
    behav = f["logprobs"].float()
    prox = _check_token_tensor("proximal_logprobs", proximal_logprobs, num_tokens, device)
    prox = behav if prox is None else prox
    ref = _check_token_tensor("ref_logprobs", ref_logprobs, num_tokens, device)
    raw_adv = advantages_for(f["rewards"], f["loss_mask"], f["cu_seqlens"], gamma=cfg.gamma, lam=cfg.lam,
                             normalize=False, logprobs=prox, ref_logprobs=ref, kl_coef=cfg.kl_coef,
                             kl_estimator=cfg.kl_estimator)
    adv = estimate_advantages(raw_adv, f["loss_mask"], f["cu_seqlens"], cfg.advantage, cfg.normalize_advantages,
                              groups, _seq_weights(batch))
    # ppo.mismatch: each token's weight pi_prox/pi_behav as corrected, and the tokens that stay in the loss
    imp_w, train_mask = mismatch_weights(prox, behav, f["loss_mask"], f["cu_seqlens"], mode=cfg.mismatch,
                                         level=cfg.mismatch_level, threshold=cfg.mismatch_threshold,
                                         threshold_low=cfg.mismatch_threshold_low, cap=cfg.behaviour_imp_cap)

    model.train()
    world = World.alone(model) if world is None else world
    totals = dict.fromkeys(_SUMMED, 0.0)  # this rank's share; summed over ranks below
    losses, grad_norms = [], []
    for seqs in split_minibatches(f["cu_seqlens"].numel() - 1, cfg.minibatches):
        pos, mb_cu_all = gather_sequences(f["cu_seqlens"], seqs)
        n_loss = int(train_mask[pos].sum())
        if n_loss == 0:
            continue  # a minibatch of prompts only: nothing to learn from
        weights = _aggregation_weights(cfg, train_mask, pos, mb_cu_all)
        optimizer.zero_grad(set_to_none=True)
        mb_loss = 0.0
        plan = _rank_plan(f["cu_seqlens"], seqs, cfg.max_tokens_per_micro_batch, world)
        for mb in plan:
            if not mb:  # more rank slots than sequences: this rank adds zero, but joins the sum
                zero_step(world, f["input_ids"][pos])
                continue
            mpos, mb_cu = gather_sequences(f["cu_seqlens"], mb)
            mask = f["loss_mask"][mpos]
            lp, ent = world.forward(f["input_ids"][mpos], mb_cu, temperature=cfg.temperature,
                                    with_entropy=True, only=mask,
                                    prompt_lens=prompt_lengths(mask, mb_cu) if cfg.share_prompts else None)
            loss, st = policy_loss(cfg, lp, prox[mpos], adv[mpos], train_mask[mpos], mb_cu, imp_w[mpos],
                                   normalizer=n_loss, token_weights=None if weights is None else weights[mpos])
            # FSDP averages the ranks' gradients; times the world size they are summed: one rank's
            (loss * world.size if world.size > 1 else loss).backward()
            mb_loss += float(loss.detach())
            st["entropy"] = torch.where(train_mask[mpos], ent.detach(), 0.0).sum()
            st["n_micro"] = 1.0
            for k, v in st.items():
                totals[k] += float(v)
        grad_norms.append(clipped_step(optimizer, cfg.max_grad_norm, "train_step"))
        losses.append(mb_loss)
    optimizer.zero_grad(set_to_none=True)
    if world.size > 1:  # the metrics of the whole batch: every rank's share summed
        summed = world.sum(torch.tensor([*losses, *totals.values()], dtype=torch.float64, device=device)).tolist()
        losses, totals = summed[:len(losses)], dict(zip(totals, summed[len(losses):]))

    n = max(totals.get("n_tokens", 0.0), 1.0)
    mask = f["loss_mask"]
    return dict(
        loss=sum(losses) / max(len(losses), 1),
        clip_frac=totals.get("clipped", 0.0) / n,
        dual_clip_frac=totals.get("dual_clipped", 0.0) / n,
        approx_kl=totals.get("approx_kl", 0.0) / n,
        entropy=totals.get("entropy", 0.0) / n,
        importance_ratio=totals.get("ratio", 0.0) / n,
        behav_imp_weight=totals.get("behav_imp_weight", 0.0) / n,
        behav_masked_frac=totals.get("behav_masked", 0.0) / n,
        grad_norm=sum(grad_norms) / max(len(grad_norms), 1),
        grad_norm_max=max(grad_norms, default=0.0),
        reward_mean=float(f["rewards"].float().mean()),
        advantage_mean=float(raw_adv[mask].mean()) if mask.any() else 0.0,
        advantage_std=float(raw_adv[mask].std(unbiased=False)) if mask.any() else 0.0,
        n_seqs=float(f["cu_seqlens"].numel() - 1),
        n_tokens=float(num_tokens),
        n_loss_tokens=float(n),
        n_minibatches=float(len(losses)),
        n_micro_batches=float(totals["n_micro"]),
        mismatch_dropped_frac=float((mask & ~train_mask).sum()) / max(int(mask.sum()), 1),
        lr=float(optimizer.param_groups[0]["lr"]),
        **({} if ref is None or not mask.any() else
           {"ref_kl": float(kl_estimate(prox, ref, cfg.kl_estimator)[mask].mean())}),
    )


# ----------------------------------------------------------------------------- SFT

def sft_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, cfg: SFTConfig) -> dict[str, float]:
    """One optimiser step of supervised fine-tuning on the loss-mask (response) tokens of a packed batch."""
    assert_trainable(model)
    device = _device(model)
    _check_precision(optimizer, cfg, device)
    ids, cu = batch.input_ids.to(device), batch.cu_seqlens.to(device)
    check_packed(ids, cu)
    loss_mask = batch.loss_mask.to(device).bool()
    if loss_mask.shape != ids.shape:
        raise ValueError(f"batch.loss_mask: expected shape {tuple(ids.shape)}, got {tuple(loss_mask.shape)}")
    n_loss = int(loss_mask.sum())
    if n_loss == 0:
        raise ValueError("sft_step: batch has no loss tokens (loss_mask is all False)")
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total, n_micro = 0.0, 0
    for mb in _plan(cu, list(range(cu.numel() - 1)), cfg.max_tokens_per_micro_batch):
        pos, mb_cu = gather_sequences(cu, mb)
        lp, _ = packed_logprobs(model, ids[pos], mb_cu, only=loss_mask[pos])
        loss = sft_loss(lp, loss_mask[pos], normalizer=n_loss)
        loss.backward()
        total += float(loss.detach())
        n_micro += 1
    grad_norm = clipped_step(optimizer, cfg.max_grad_norm, "sft_step")
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=total, perplexity=math.exp(min(total, 50.0)), grad_norm=grad_norm,
                n_loss_tokens=float(n_loss), n_micro_batches=float(n_micro),
                lr=float(optimizer.param_groups[0]["lr"]))
