"""Sequence-level reward from the verifier's verdict (boba: +5 correct, -5 wrong)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RewardConfig:
    correct: float = 5.0
    wrong: float = -5.0

    def __post_init__(self) -> None:
        for name in ("correct", "wrong"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"RewardConfig.{name} must be a finite number, got {v!r}")
        if self.correct <= self.wrong:
            raise ValueError(
                f"RewardConfig: correct ({self.correct}) must be greater than wrong ({self.wrong})"
            )


def reward(correct: bool, cfg: RewardConfig = RewardConfig()) -> float:
    return float(cfg.correct if correct else cfg.wrong)
