"""The optimiser of the recipe: AdamW over the trainable parameters, optionally on fp32 master weights.

With `cfg.bf16` the model computes in bfloat16 end to end (weights, activations, gradients), as
AReaL's Megatron backend trains, while AdamW updates fp32 master copies of the weights: an update of
lr * m / sqrt(v) ~ 1e-5 is below half a bf16 ulp of most weights and would round away. Autocast
over fp32 weights gives the same matmul precision but casts every weight and activation on the way
in and every gradient on the way out: a third of a PPO step on a CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from policies.model.loading import assert_trainable
from policies.model.precision import resolve_bf16


def _adamw(params: list[Tensor], cfg) -> torch.optim.AdamW:
    betas = tuple(getattr(cfg, "adam_betas", (0.9, 0.999)))
    # the fused kernel is one pass over each tensor (~6x the default on a CPU); cpu and cuda have it
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                             fused=fused)


class MasterWeightAdamW:
    """AdamW on fp32 masters of a bf16 model's weights.

    Each backward pass adds the bf16 gradient into the master's fp32 `.grad` (a post-accumulate hook)
    and drops it, so micro-batches accumulate in fp32; `step` updates the masters and copies them,
    rounded, into the model. `param_groups` are the masters': clip and schedule those.
    """

    master_weights = True

    def __init__(self, params: list[nn.Parameter], cfg, dtype: torch.dtype = torch.bfloat16):
        self.params = params
        self.masters = [nn.Parameter(p.detach().float().clone()) for p in params]  # before the model is cast
        self.inner = _adamw(self.masters, cfg)
        with torch.no_grad():
            for p in params:
                p.data = p.data.to(dtype)
        # fp32 gradient buffers live across steps: a fresh 100 MB tensor is fresh pages on every step
        self._grad_bufs: list[Tensor | None] = [None] * len(params)
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate(i)) for i, p in enumerate(params)]

    def _accumulate(self, i: int):
        master = self.masters[i]

        def hook(p: Tensor) -> None:
            if master.grad is not None:
                master.grad.add_(p.grad)
            else:
                if self._grad_bufs[i] is None:
                    self._grad_bufs[i] = torch.empty_like(master)
                master.grad = self._grad_bufs[i].copy_(p.grad)
            p.grad = None
        return hook

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        torch._foreach_copy_(self.params, self.masters)

    @torch.no_grad()
    def release(self) -> None:
        """Training is over: the model takes its fp32 masters as its weights; this optimiser is done."""
        for h in self._hooks:
            h.remove()
        for p, m in zip(self.params, self.masters):
            p.data = m.detach()
            p.grad = None
        self.params, self.masters, self._hooks = [], [], []

    def state_dict(self) -> dict:
        return {"adamw": self.inner.state_dict(), "masters": [m.detach() for m in self.masters]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        masters = state.get("masters") if isinstance(state, dict) else None
        if masters is None or len(masters) != len(self.masters):
            raise ValueError(f"optimizer state: expected {len(self.masters)} fp32 master weights (an optimizer saved "
                             f"with bf16 training), got {'none' if masters is None else len(masters)}")
        for m, saved in zip(self.masters, masters):
            if m.shape != saved.shape:
                raise ValueError(f"optimizer state: master weight of shape {tuple(saved.shape)} for a parameter "
                                 f"of shape {tuple(m.shape)}")
            m.copy_(saved)
        self.inner.load_state_dict(state["adamw"])
        torch._foreach_copy_(self.params, self.masters)


def make_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW | MasterWeightAdamW:
    """AdamW with cfg.lr / adam_eps / weight_decay (and adam_betas when cfg has them). With a true
    `cfg.bf16` (or "auto" where bf16 is native) the model's weights become bf16 and the optimiser keeps
    them in fp32 (see module doc)."""
    assert_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__}: has no parameters that require grad")
    if resolve_bf16(getattr(cfg, "bf16", False), params[0].device):
        return MasterWeightAdamW(params, cfg)
    return _adamw(params, cfg)


def clipped_step(optimizer, max_grad_norm: float, who: str) -> float:
    """Clip the gradients to `max_grad_norm` and step; returns the norm before clipping. A non-finite norm
    drops the gradients and raises FloatingPointError naming `who`: one bad batch must not poison the weights."""
    grad_norm = torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), max_grad_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"{who}: gradient norm is {float(grad_norm)}; step skipped")
    optimizer.step()
    return float(grad_norm)


def optimizer_params(optimizer) -> list[Tensor]:
    """The tensors the optimiser updates (masters under bf16): the gradients to clip."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def full_precision_state(model: nn.Module, optimizer) -> dict[str, Tensor] | None:
    """The model's state dict with fp32 masters in place of bf16 weights, or None without masters.
    Tied weights stay one tensor, so they are saved once."""
    if not getattr(optimizer, "master_weights", False):
        return None
    masters = {id(p): m.detach() for p, m in zip(optimizer.params, optimizer.masters)}
    return {name: masters.get(id(t), t.detach()) for name, t in model.state_dict(keep_vars=True).items()}
