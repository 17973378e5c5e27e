"""Is a response's boxed answer equal to the reference? (in-process, no timeout)

Order of the checks, cheapest first: extract the last box; refuse answers too
costly to parse (``answer_guard``); normalise both sides (``answer_normalize``);
equal strings; text answers compared case-insensitively; plain numbers compared
exactly with ``Fraction``; everything else goes to math-verify (sympy).

math-verify's own timeouts use SIGALRM, which only works in a main thread and
only interrupts Python code; here they are switched off and the caller bounds
the time (``VerifierPool`` runs this in worker processes it can kill).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache

from math_verify import parse, verify

from policies.verify.answer_guard import GuardConfig, refusal
from policies.verify.answer_normalize import Answer, exact_number, normalize, plain_text
from policies.verify.boxed import extract_boxed


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeout is off; we bound time ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())

Reference = str | Sequence[str]


def final_answer(response: str, guard: GuardConfig = GuardConfig()) -> str | None:
    """The boxed answer worth grading, or None (no box, empty, or too costly)."""
    if not isinstance(response, str):
        raise TypeError(f"response must be str, got {type(response).__name__}")
    ans = extract_boxed(response)
    if ans is None or not ans.strip() or refusal(ans, guard) is not None:
        return None
    return ans


def gold_answers(reference: Reference) -> list[str]:
    """The acceptable answers of a reference: a string or a list of strings.

    A reference that is a worked solution (contains a ``\\boxed{}``) counts by its
    boxed answer; anything else is the answer itself.
    """
    refs = [reference] if isinstance(reference, str) else reference
    if not isinstance(refs, Sequence) or not refs:
        raise TypeError(f"reference must be a str or a non-empty list of str, got {reference!r:.80}")
    out = []
    for r in refs:
        if not isinstance(r, str):
            raise TypeError(f"reference entries must be str, got {type(r).__name__}: {r!r:.80}")
        boxed = extract_boxed(r) if ("\\boxed" in r or "\\fbox" in r) else None
        ans = boxed if boxed is not None else r
        if ans.strip():
            out.append(ans)
    return out


def is_correct(response: str, reference: Reference) -> bool:
    """True when the last boxed answer of ``response`` equals the reference.

    No box, an unbalanced box, or an answer refused as too costly is wrong.
    Runs in the calling thread without a time limit beyond the guard's checks;
    use ``VerifierPool`` for untrusted answers at scale.
    """
    ans = final_answer(response)
    if ans is None:
        return False
    return match_answer(ans, gold_answers(reference))


def match_answer(answer: str, golds: Sequence[str]) -> bool:
    """Does the (already extracted and guarded) ``answer`` equal any of ``golds``?"""
    return any(_match_one(answer, g) for g in golds)


def _match_one(answer: str, gold: str) -> bool:
    p, g = normalize(answer), normalize(gold)
    if p.latex and p.latex == g.latex:
        return True
    pt, gt = plain_text(answer), plain_text(gold)
    if pt is not None and gt is not None:
        return pt == gt
    verdict = _compare_numbers(p, g)
    if verdict is not None:
        return verdict
    if not p.latex:
        return False
    gold_parsed = [x for v in g.variants() for x in _parse_gold(v)]
    pred_parsed = [x for v in p.variants() for x in _parse(v)]
    if not gold_parsed or not pred_parsed:
        return False
    return verify(gold_parsed, pred_parsed, timeout_seconds=None)


def _compare_numbers(p: Answer, g: Answer) -> bool | None:
    """Exact verdict when both sides are plain numbers; None to defer to sympy.

    Equal values are a match (X% stands for X and X/100). Unequal values are a
    mismatch only when neither side is a decimal: ``1/3`` vs ``0.333333`` is left
    to math-verify's rounding.
    """
    pn, gn = exact_number(p.latex), exact_number(g.latex)
    if pn is None or gn is None:
        return None
    if _values(pn[0], p.percent) & _values(gn[0], g.percent):
        return True
    return None if (pn[1] or gn[1]) else False


def _values(v: Fraction, percent: bool) -> set[Fraction]:
    return {v, v / 100} if percent else {v}


def _parse(latex: str) -> list:
    return parse("\\boxed{" + latex + "}", parsing_timeout=None)


@lru_cache(maxsize=4096)
def _parse_gold(latex: str) -> tuple:
    """References repeat G times per prompt (one per sampled response): parse once."""
    return tuple(_parse(latex))
