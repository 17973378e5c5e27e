"""Reference answers out of a dataset's answer field (`data.answer_format`).

Datasets keep the answer in their own shape: GSM8K ends a worked solution with "#### 72", MATH
keeps a whole solution whose last \\boxed{} holds the answer. The verifier wants the answer itself,
so each format names how to cut it out; a row where the cut finds nothing is a malformed row.
"""
from __future__ import annotations

import re
from typing import Any

from policies.verify.boxed import extract_boxed

FORMATS = ("raw", "boxed", "gsm8k")


class AnswerFormatError(ValueError):
    """The answer field does not have the declared format; the message says what was looked for."""


class AnswerFieldError(ValueError):
    """One row's answer field is unusable; the message names the field (the caller adds file:line)."""


def _gsm8k(text: str) -> str:
    head, sep, tail = text.rpartition("####")
    if not sep:
        raise AnswerFormatError("no '####' before the final answer (data.answer_format: gsm8k)")
    answer = tail.strip().replace(",", "").removeprefix("$").rstrip(".").strip()
    if not answer:
        raise AnswerFormatError("nothing after '####' (data.answer_format: gsm8k)")
    return answer


def _boxed(text: str) -> str:
    answer = extract_boxed(text)
    if answer is None or not answer.strip():
        raise AnswerFormatError("no complete \\boxed{} answer (data.answer_format: boxed)")
    return answer.strip()


# a worked solution whose last line is GSM8K's "#### 72": read raw, the whole solution would be the reference
_GSM8K_TAIL = re.compile(r"\S[\s\S]*\n\s*####\s*\$?-?[\d,]+(\.\d+)?\s*$")


def extract_answer(text: str, fmt: str) -> str:
    """The reference answer in `text` read as `fmt` (raw: `text` itself, unless it is a GSM8K solution:
    then no answer would ever match it, and the run would learn nothing without a word)."""
    if fmt == "raw":
        if _GSM8K_TAIL.match(text):
            raise AnswerFormatError("looks like a GSM8K solution ending '#### N' but data.answer_format is raw: "
                                    "set data.answer_format: gsm8k (--answer-format gsm8k for eval, filter, sft)")
        return text
    if fmt == "gsm8k":
        return _gsm8k(text)
    if fmt == "boxed":
        return _boxed(text)
    raise ValueError(f"answer format {fmt!r}: expected one of {', '.join(FORMATS)}")


def reference_answers(value: Any, fmt: str, key: str) -> list[str]:
    """The references of one row's `key` field: a string, a number, or a non-empty list of strings.

    Raises `AnswerFieldError` naming `key` (the caller adds file:line).
    """
    if isinstance(value, (list, tuple)):
        if not value:
            raise AnswerFieldError(f"{key!r} is an empty list")
        items = list(value)
    else:
        items = [value]
    out = []
    for i, item in enumerate(items):
        where = f"{key!r}[{i}]" if len(items) > 1 or isinstance(value, (list, tuple)) else repr(key)
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise AnswerFieldError(f"{where} must be a string or a number, got {type(item).__name__}")
        text = item if isinstance(item, str) else repr(item)
        if not text.strip():
            raise AnswerFieldError(f"{where} is empty")
        try:
            out.append(extract_answer(text, fmt) if isinstance(item, str) else text)
        except AnswerFormatError as e:
            raise AnswerFieldError(f"{where}: {e}; got {_short(text)}") from None
    return out


def _short(text: str, n: int = 60) -> str:
    text = re.sub(r"\s+", " ", text)
    return repr(text if len(text) <= n else "..." + text[-n:])
