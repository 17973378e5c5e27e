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

from policies.train.advantages import advantages_for, kl_estimate, normalize_advantages
from policies.train.data_parallel import World, idle_forward, rank_share, zero_step
from policies.model.logprobs import check_packed, packed_logprobs
from policies.train.losses import ppo_loss, sft_loss  # noqa: F401  (re-exported)
from policies.model.loading import assert_trainable
from policies.train.optim import clipped_step, make_optimizer  # noqa: F401  (make_optimizer re-exported)
from policies.model.precision import is_bool_or_auto, resolve_bf16
from policies.train.schedule import SCHEDULES
from policies.model.shared_prompts import prompt_lengths


def _check(cond: bool, field: str, msg: str, value) -> None:
    if not cond:
        raise ValueError(f"{field}={value!r}: {msg}")


@dataclass
class PPOConfig:
    minibatches: int = 4          # PPO minibatches per training batch (release: 4)
    lr: float = 2e-5
    adam_eps: float = 1e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps_clip: float = 0.2
    dual_clip: float | None = None   # c > 1, or None
    gamma: float = 1.0
    lam: float = 1.0
    kl_coef: float = 0.0
    kl_estimator: str = "k1"        # "k1" | "k3"
    normalize_advantages: bool | Literal["batch", "group", "none"] = True  # true = batch, false = none;
    # batch: mean/std over all response tokens of the batch (boba); group: per prompt's G samples (GRPO)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # decay after warm-up (policies.train.schedule)
    warmup_steps: int = 0            # RL steps of linear warm-up to lr
    min_lr_ratio: float = 0.0        # linear/cosine decay ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0
    max_tokens_per_micro_batch: int = 8192
    behaviour_imp_cap: float | None = 5.0   # decoupled PPO: cap on pi_prox/pi_behav; tokens above are masked
    temperature: float = 1.0         # logits temperature used by the generator, applied when recomputing logprobs
    bf16: bool | Literal["auto"] = False  # bf16 weights and compute, fp32 master weights in the optimiser;
    # "auto": where bf16 is native (policies.model.precision)
    compile: bool = False            # torch.compile the decoder layers and the head math (policies.model.loading)
    share_prompts: bool = True       # the samples of a prompt run it through the model once (policies.model.shared_prompts)
    gradient_checkpointing: bool = False  # keep only each decoder layer's input; recompute the rest in backward
    recompute_logprobs: bool | Literal["auto"] = "auto"  # the learner recomputes the proximal logprobs before
    # the minibatches; "auto": unless the generator's logprobs are already the learner's (actors.learner.recompute_needed)

    def __post_init__(self) -> None:
        _check(isinstance(self.minibatches, int) and self.minibatches >= 1, "minibatches", "must be an int >= 1", self.minibatches)
        _check(self.lr > 0, "lr", "must be > 0", self.lr)
        _check(self.adam_eps > 0, "adam_eps", "must be > 0", self.adam_eps)
        self.adam_betas = tuple(self.adam_betas)  # yaml gives lists
        _check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
               "adam_betas", "must be two numbers in [0, 1)", self.adam_betas)
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check(0 < self.eps_clip < 1, "eps_clip", "must be in (0, 1)", self.eps_clip)
        _check(self.dual_clip is None or self.dual_clip > 1, "dual_clip", "must be None or > 1", self.dual_clip)
        _check(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]", self.gamma)
        _check(0 <= self.lam <= 1, "lam", "must be in [0, 1]", self.lam)
        _check(self.kl_coef >= 0, "kl_coef", "must be >= 0", self.kl_coef)
        _check(self.kl_estimator in ("k1", "k3"), "kl_estimator", "must be 'k1' or 'k3'", self.kl_estimator)
        _check(self.normalize_advantages in (True, False, "batch", "group", "none"), "normalize_advantages",
               "must be batch, group, none (or true = batch, false = none)", self.normalize_advantages)
        _check(self.lr_schedule in SCHEDULES, "lr_schedule", f"must be one of {', '.join(SCHEDULES)}",
               self.lr_schedule)
        _check(isinstance(self.warmup_steps, int) and not isinstance(self.warmup_steps, bool)
               and self.warmup_steps >= 0, "warmup_steps", "must be an int >= 0", self.warmup_steps)
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0", self.max_grad_norm)
        _check(isinstance(self.max_tokens_per_micro_batch, int) and self.max_tokens_per_micro_batch >= 1,
               "max_tokens_per_micro_batch", "must be an int >= 1", self.max_tokens_per_micro_batch)
        _check(self.behaviour_imp_cap is None or self.behaviour_imp_cap > 1, "behaviour_imp_cap",
               "must be None or > 1", self.behaviour_imp_cap)
        _check(self.temperature > 0, "temperature", "must be > 0", self.temperature)
        _check(is_bool_or_auto(self.bf16), "bf16", "must be true, false or 'auto'", self.bf16)
        _check(isinstance(self.compile, bool), "compile", "must be a bool", self.compile)
        _check(isinstance(self.share_prompts, bool), "share_prompts", "must be a bool", self.share_prompts)
        _check(is_bool_or_auto(self.recompute_logprobs), "recompute_logprobs", "must be true, false or 'auto'",
               self.recompute_logprobs)


@dataclass
class SFTConfig:
    lr: float = 1e-5
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_tokens_per_micro_batch: int = 8192
    epochs: int = 1
    batch_size: int = 16
    bf16: bool | Literal["auto"] = False
    compile: bool = False

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", "must be > 0", self.lr)
        _check(self.adam_eps > 0, "adam_eps", "must be > 0", self.adam_eps)
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0", self.max_grad_norm)
        _check(isinstance(self.max_tokens_per_micro_batch, int) and self.max_tokens_per_micro_batch >= 1,
               "max_tokens_per_micro_batch", "must be an int >= 1", self.max_tokens_per_micro_batch)
        _check(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be an int >= 1", self.epochs)
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be an int >= 1", self.batch_size)
        _check(is_bool_or_auto(self.bf16), "bf16", "must be true, false or 'auto'", self.bf16)
        _check(isinstance(self.compile, bool), "compile", "must be a bool", self.compile)


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
    adv = normalize_advantages(raw_adv, f["loss_mask"], f["cu_seqlens"], cfg.normalize_advantages, groups)

    model.train()
    world = World.alone(model) if world is None else world
    totals = dict.fromkeys(_SUMMED, 0.0)  # this rank's share; summed over ranks below
    losses, grad_norms = [], []
    for seqs in split_minibatches(f["cu_seqlens"].numel() - 1, cfg.minibatches):
        pos, _ = gather_sequences(f["cu_seqlens"], seqs)
        n_loss = int(f["loss_mask"][pos].sum())
        if n_loss == 0:
            continue  # a minibatch of prompts only: nothing to learn from
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
            loss, st = ppo_loss(lp, prox[mpos], behav[mpos], adv[mpos], mask, eps_clip=cfg.eps_clip,
                                dual_clip=cfg.dual_clip, behaviour_imp_cap=cfg.behaviour_imp_cap,
                                normalizer=n_loss)
            # FSDP averages the ranks' gradients; times the world size they are summed: one rank's
            (loss * world.size if world.size > 1 else loss).backward()
            mb_loss += float(loss.detach())
            st["entropy"] = torch.where(mask, ent.detach(), 0.0).sum()
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
