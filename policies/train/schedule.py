"""Learning-rate schedule of the RL steps: linear warm-up, then constant, linear or cosine decay.

A pure function of the step, so a resumed run (or a restarted learner) picks the rate up where it
was without any scheduler state in the checkpoint. Step s is 0-based; warm-up rises to the full rate
at step `warmup_steps - 1` (step 0 already trains, at lr / warmup_steps); the decay then runs from
the full rate to `min_lr_ratio * lr` over the remaining steps, as verl's and TRL's schedules do.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, *, lr: float, total_steps: int, schedule: str = "constant", warmup_steps: int = 0,
          min_lr_ratio: float = 0.0) -> float:
    """The learning rate of RL step `step` (0-based) of `total_steps`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}: must be one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)


def scheduled_lr(cfg, step: int, total_steps: int) -> float:
    """`lr_at` with a PPOConfig's lr, lr_schedule, warmup_steps and min_lr_ratio."""
    return lr_at(step, lr=cfg.lr, total_steps=total_steps, schedule=cfg.lr_schedule,
                 warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)
