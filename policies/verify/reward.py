"""Sequence-level reward from the verifier's verdict (boba: +5 correct, -5 wrong), or from users' functions.

With `fns` empty (the default) a response earns `correct` or `wrong` by the \\boxed{} check. With
`fns` set, its reward is the weighted sum of those functions (policies.verify.reward_fns), run in the
verifier's process pool; a response on which one fails gets `on_error` and is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _finite(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass(frozen=True)
class RewardFn:
    fn: str                 # "package.module:function" or "path/to/file.py:function"
    weight: float = 1.0

    def __post_init__(self) -> None:
        from policies.verify.reward_fns import RewardFnError, parse_spec
        if not isinstance(self.fn, str):
            raise ValueError(f"fn={self.fn!r}: must be a string 'package.module:function'")
        try:
            parse_spec(self.fn)
        except RewardFnError:
            raise ValueError(f"fn={self.fn!r}: expected 'package.module:function' or "
                             "'path/to/file.py:function'") from None
        if not _finite(self.weight):
            raise ValueError(f"weight={self.weight!r}: must be a finite number")


@dataclass(frozen=True)
class RewardConfig:
    correct: float = 5.0
    wrong: float = -5.0
    fns: tuple[RewardFn, ...] = ()
    on_error: float = 0.0

    def __post_init__(self) -> None:
        for name in ("correct", "wrong", "on_error"):
            v = getattr(self, name)
            if not _finite(v):
                raise ValueError(f"RewardConfig.{name} must be a finite number, got {v!r}")
        if self.correct <= self.wrong:
            raise ValueError(
                f"RewardConfig: correct ({self.correct}) must be greater than wrong ({self.wrong})"
            )
        object.__setattr__(self, "fns", tuple(self.fns))


def reward(correct: bool, cfg: RewardConfig = RewardConfig()) -> float:
    return float(cfg.correct if correct else cfg.wrong)
