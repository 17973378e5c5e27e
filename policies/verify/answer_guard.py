"""Cheap checks that refuse answers sympy could spend forever on.

A model can box ``9^{9^{9^{9}}}``, ten thousand nested braces or a megabyte of
digits. Each check here is a linear scan; an answer that fails one is simply
wrong, without ever reaching the parser. What slips through is left to the
pool's per-answer timeout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GuardConfig:
    max_chars: int = 2000  # a real final answer is a few dozen characters
    max_depth: int = 40  # nesting of {} () []
    max_atoms: int = 400  # numbers, letters and commands: sympy's work grows with them
    max_digits: int = 100_000  # decimal digits a power may evaluate to
    max_factorial: int = 5_000  # n! for n above this is refused

    def __post_init__(self) -> None:
        for name in ("max_chars", "max_depth", "max_atoms", "max_digits", "max_factorial"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GuardConfig.{name} must be > 0, got {getattr(self, name)}")


_OPEN, _CLOSE = "{([", "})]"
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_FACTORIAL = re.compile(r"(\d+)\s*!")
_CARET = re.compile(r"\^|\*\*")
_ATOM = re.compile(r"\\[A-Za-z]+|[A-Za-z]|\d+")


def refusal(answer: str, cfg: GuardConfig = GuardConfig()) -> str | None:
    """Why ``answer`` is too costly to verify, or None when it may be parsed."""
    if len(answer) > cfg.max_chars:
        return f"answer has {len(answer)} chars (limit {cfg.max_chars})"
    depth = deepest = 0
    for ch in re.findall(r"[{}()\[\]]", answer):
        depth += 1 if ch in _OPEN else -1
        deepest = max(deepest, depth)
    if deepest > cfg.max_depth:
        return f"answer nests {deepest} levels of brackets (limit {cfg.max_depth})"
    atoms = sum(1 for _ in _ATOM.finditer(answer))
    if atoms > cfg.max_atoms:
        return f"answer has {atoms} symbols and numbers (limit {cfg.max_atoms})"
    for m in _FACTORIAL.finditer(answer):
        if int(m.group(1)) > cfg.max_factorial:
            return f"factorial of {m.group(1)} (limit {cfg.max_factorial})"
    digits = _power_digits(answer, limit=cfg.max_digits)
    if digits > cfg.max_digits:
        return f"a power in the answer has about {digits:.3g} digits (limit {cfg.max_digits})"
    return None


def _power_digits(text: str, limit: float = math.inf) -> float:
    """Upper estimate of the decimal digits of the largest power in ``text``.

    Carets (``^{...}``, ``^9``, ``**``) are sized right to left, so in a tower
    ``a^{b^{c}}`` the inner power is known when its exponent is read: the
    exponent's log10 is at most the larger of the inner powers' digits and the
    sum of log10 of its plain numbers. A base that is not a number counts as 10.
    Linear-ish in the length; stops as soon as one power exceeds ``limit``.
    """
    carets = [(m.start(), m.end()) for m in _CARET.finditer(text)]
    sized: list[tuple[int, float]] = []  # (caret position, digits), increasing position
    worst = 0.0
    for start, end in reversed(carets):
        lo, hi = _exponent_span(text, end)
        inner = [d for pos, d in sized if lo <= pos < hi]
        logs = [math.log10(max(float(n), 1.0)) for n in _NUMBER.findall(text, lo, hi)]
        if not inner and not logs:
            continue  # a symbolic exponent: x^{n}, 30^{\circ}
        log_exp = max(max(inner, default=0.0), sum(logs))
        if log_exp > 300:
            return math.inf
        digits = (10.0**log_exp) * math.log10(max(_number_before(text, start), 2.0))
        if digits > limit:
            return digits
        worst = max(worst, digits)
        sized.insert(0, (start, digits))
    return worst


def _number_before(text: str, pos: int) -> float:
    m = re.search(r"(\d+(?:\.\d+)?)\s*\}?\s*$", text[max(0, pos - 40) : pos])
    return float(m.group(1)) if m else 10.0


_PLAIN_EXPONENT = re.compile(r"\s*\(?[\d.]+(?:\s*(?:\^|\*\*)\s*\(?[\d.]+)*")


def _exponent_span(text: str, pos: int) -> tuple[int, int]:
    """[lo, hi) of the exponent that starts at ``pos`` (just after the caret)."""
    while pos < len(text) and text[pos] == " ":
        pos += 1
    if pos < len(text) and text[pos] == "{":
        depth = 0
        for m in re.finditer(r"[{}]", text[pos:]):
            depth += 1 if m.group(0) == "{" else -1
            if depth == 0:
                return pos + 1, pos + m.start()
        return pos + 1, len(text)
    # ``9^99`` / ``9**9**9``: the number, and any power chain after it (right-associative)
    m = _PLAIN_EXPONENT.match(text, pos)
    return (pos, m.end()) if m else (pos, min(pos + 1, len(text)))
