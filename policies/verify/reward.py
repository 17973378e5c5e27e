"""Sequence-level reward from the verifier's verdict (boba: +5 correct, -5 wrong), or from users' functions,
plus DAPO's soft overlong punishment where `overlong` is on.

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
class OverlongConfig(Checked):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to max_len - buffer tokens, then
    falling linearly to -penalty at max_len (and -penalty beyond)."""
    buffer: int = opt(0, check=lambda v: v >= 0, expect=">= 0", doc="tokens before max_len where it starts; 0 = off")
    penalty: float | None = opt(None, check=lambda v: v is None or v >= 0, expect=">= 0",
                                doc="the punishment at max_len; null = (correct - wrong) / 2, DAPO's 1 on its "
                                    "+-1 reward")
    max_len: int | None = opt(None, check=lambda v: v is None or v >= 1, expect=">= 1",
                              doc="null = rollout.max_new_tokens")

    def check(self) -> None:
        if self.buffer and self.max_len is not None and self.buffer > self.max_len:
            raise FieldError("buffer", f"at most max_len ({self.max_len})", self.buffer)


def overlong_punishment(response_len: int, cfg: OverlongConfig, scale: float) -> float:
    """The (non-positive) reward term for a response of `response_len` tokens; `scale` is the penalty
    where cfg.penalty is null."""
    if not cfg.buffer or cfg.max_len is None:
        return 0.0
    penalty = scale if cfg.penalty is None else cfg.penalty
    start = cfg.max_len - cfg.buffer
    if response_len <= start:
        return 0.0
    return -penalty * min(response_len - start, cfg.buffer) / cfg.buffer


@dataclass(frozen=True)
class RewardConfig(Checked):
    correct: float = opt(5.0, check=_finite, expect="(finite)")
    wrong: float = opt(-5.0, check=_finite, expect="(finite)")
    fns: tuple[RewardFn, ...] = opt((), doc="users' reward functions, summed with their weights; empty = "
                                        "correct/wrong by the \\boxed{} check")
    on_error: float = opt(0.0, check=_finite, expect="(finite)",
                          doc="the reward of a response on which one of fns fails")
    overlong: OverlongConfig | None = opt(None, doc="DAPO's soft overlong punishment, added to every reward; "
                                                    "null = ppo.recipe's (dapo: buffer a fifth of max_new_tokens)")

    def check(self) -> None:
        if self.correct <= self.wrong:
            raise FieldError("wrong", f"a number below correct ({self.correct})", self.wrong)


def reward(correct: bool, cfg: RewardConfig = RewardConfig(), response_len: int | None = None) -> float:
    return float(cfg.correct if correct else cfg.wrong) + length_term(response_len, cfg)


def length_term(response_len: int | None, cfg: RewardConfig) -> float:
    """What a response's length adds to its reward (the overlong punishment; 0 when off)."""
    if cfg.overlong is None or response_len is None:
        return 0.0
    return overlong_punishment(response_len, cfg.overlong, (cfg.correct - cfg.wrong) / 2)
