"""Sequence-level reward from the verifier's verdict (boba: +5 correct, -5 wrong), or from users' functions.

With `fns` empty (the default) a response earns `correct` or `wrong` by the \\boxed{} check. With
`fns` set, its reward is the weighted sum of those functions (policies.verify.reward_fns), run in the
verifier's process pool; a response on which one fails gets `on_error` and is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies.settings import Checked, FieldError, opt


def _finite(v) -> bool:
    return math.isfinite(v)


def _spec(fn: str) -> bool:
    from policies.verify.reward_fns import RewardFnError, parse_spec
    try:
        parse_spec(fn)
    except RewardFnError:
        return False
    return True


@dataclass(frozen=True)
class RewardFn(Checked):
    fn: str = opt(check=_spec, expect="'package.module:function' or 'path/to/file.py:function'",
                  doc='"package.module:function" or "path/to/file.py:function"')
    weight: float = opt(1.0, check=_finite, expect="(finite)")


@dataclass(frozen=True)
class RewardConfig(Checked):
    correct: float = opt(5.0, check=_finite, expect="(finite)")
    wrong: float = opt(-5.0, check=_finite, expect="(finite)")
    fns: tuple[RewardFn, ...] = opt((), doc="users' reward functions, summed with their weights; empty = "
                                        "correct/wrong by the \\boxed{} check")
    on_error: float = opt(0.0, check=_finite, expect="(finite)",
                          doc="the reward of a response on which one of fns fails")

    def check(self) -> None:
        if self.correct <= self.wrong:
            raise FieldError("wrong", f"a number below correct ({self.correct})", self.wrong)


def reward(correct: bool, cfg: RewardConfig = RewardConfig()) -> float:
    return float(cfg.correct if correct else cfg.wrong)
