"""reasoning-gym's own scorers as a reward function (`reward.fns`), for rows made by `python -m launcher data`.

    reward:
      fns: [{fn: "policies.verify.gym_score:reasoning_gym", weight: 5.0}]

The response's last \\boxed{} answer goes to the scorer of the row's generator (`source`) with the
row's `answer` and `metadata` (launcher.gymdata writes both). Its score of 1.0 is a correct answer:
+1 (times the weight: boba's +5 with weight 5); anything less (its small partial scores for a near
miss or a number in the wrong place) is wrong: -1. The verifier counts a reward above 0 as correct.
reasoning-gym is imported here, at the top, so that the verifier's workers pay its import (seconds)
while they start, not under a response's timeout.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

from reasoning_gym.factory import DATASETS, get_score_answer_fn  # the package's import registers every generator

from policies.verify.boxed import extract_boxed

CORRECT, WRONG = 1.0, -1.0


@lru_cache(maxsize=None)
def _scorer(source: str) -> Callable[[str | None, dict], float]:
    return get_score_answer_fn(source)


def gym_score(response: str, source: str, answer: str, metadata: dict, question: str = "") -> float:
    """reasoning-gym's score (0..1) of the response's last \\boxed{} answer; raises ValueError for an unknown source."""
    if source not in DATASETS:
        raise ValueError(f"row's source {source!r} is not a reasoning-gym generator (rows from "
                         f"`python -m launcher data` carry one; the held-out 'mathdata' rows have none)")
    entry = {"question": question, "answer": answer, "metadata": metadata or {}}
    return float(_scorer(source)(extract_boxed(response), entry))


def reasoning_gym(prompt: str, response: str, reference: Any, extra: dict) -> float:
    """+1.0 where reasoning-gym scores the boxed answer 1.0, else -1.0 (a reward function for reward.fns)."""
    answer = reference[0] if isinstance(reference, (list, tuple)) else reference
    score = gym_score(response, extra.get("source"), str(answer), extra.get("metadata") or {}, prompt)
    return CORRECT if score >= 1.0 else WRONG
