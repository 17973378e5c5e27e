"""A custom reward for GSM8K-style data: use it with ``reward.fns`` (README: "Bring your own data, reward and model").

    reward:
      fns:
        - {fn: examples/gsm8k_reward.py:correct_number, weight: 1.0}
        - {fn: examples/gsm8k_reward.py:brevity, weight: 0.1}

A reward function takes (prompt, response, reference, extra) and returns a float; `extra` holds the
row's other columns. It runs in the verifier's worker processes, under `verifier.timeout`.
"""
from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def correct_number(prompt: str, response: str, reference, extra: dict) -> float:
    """+1 when the last number in the response equals the reference answer, -1 otherwise."""
    refs = reference if isinstance(reference, list) else [reference]
    numbers = _NUMBER.findall(response)
    if not numbers:
        return -1.0
    last = numbers[-1].replace(",", "")
    return 1.0 if any(last == str(r).replace(",", "") for r in refs) else -1.0


def brevity(prompt: str, response: str, reference, extra: dict) -> float:
    """A small bonus for short answers: 1 at zero words, 0 at 200 words or more."""
    return max(0.0, 1.0 - len(response.split()) / 200.0)
