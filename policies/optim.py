"""The optimiser of the recipe: AdamW over the trainable parameters."""
from __future__ import annotations

import torch
from torch import nn

from policies.models import assert_trainable


def make_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with cfg.lr / adam_eps / weight_decay (and adam_betas when cfg has them)."""
    assert_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__}: has no parameters that require grad")
    betas = tuple(getattr(cfg, "adam_betas", (0.9, 0.999)))
    # the fused kernel is one pass over each tensor (~6x the default on a CPU); cpu and cuda have it
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                             fused=fused)
