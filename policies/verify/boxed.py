"""Find the final answer a model put in ``\\boxed{...}`` (or ``\\fbox{...}``)."""

from __future__ import annotations

import re

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE = re.compile(r"[{}]")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); the bare form
    ``\\boxed 5`` gives the token after the space. A last box whose braces never
    close gives None: the answer was cut off, so there is nothing to grade.
    Scans braces with a regex, so a megabyte string costs milliseconds.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_boxed: text must be str, got {type(text).__name__}")
    last = None
    for last in _BOX.finditer(text):
        pass
    if last is None:
        return None
    i = last.end()
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        if i == last.end():  # "\boxedx": not a box command at all
            return None
        token = re.match(r"[^\s$]+", text[i:])  # "\boxed 5" form: one token
        return token.group(0) if token else None
    depth = 0
    for m in _BRACE.finditer(text, i):
        # a backslash-escaped brace (\{ \}) is literal text, not nesting
        if m.start() > 0 and text[m.start() - 1] == "\\" and not _escaped_backslash(text, m.start() - 1):
            continue
        depth += 1 if m.group(0) == "{" else -1
        if depth == 0:
            return text[i + 1 : m.start()]
    return None


def _escaped_backslash(text: str, pos: int) -> bool:
    """True when the backslash at ``pos`` is itself escaped (an even run ending at pos)."""
    run = 0
    while pos - run >= 0 and text[pos - run] == "\\":
        run += 1
    return run % 2 == 0
