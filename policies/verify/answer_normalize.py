"""Rewrite a boxed answer into the form the comparison expects.

The rules (each one a regex, applied in order by ``normalize``):
- ``\\dfrac`` / ``\\tfrac`` / ``\\cfrac`` are ``\\frac``; ``\\left`` / ``\\right`` and
  ``\\displaystyle`` go; LaTeX spacing (``\\,`` ``\\;`` ``\\!`` ``~``) is a space.
- Thousands separators go only where the whole answer is one grouped number
  (``1,000`` or ``1\\,000`` or ``1{,}000`` is 1000; ``(1,2)`` stays a tuple).
- Degrees (``^\\circ``, ``^{\\circ}``, ``\\degree``, ``°``) are dropped: 30° is 30.
- Currency (``\\$``) and trailing unit text (``\\text{ cm}``, ``\\mbox{m}^2``,
  ``5 dollars``) are dropped when a number precedes them.
- Percent: a trailing ``\\%`` / ``percent`` is removed and remembered. The rule:
  an answer written as X% equals both X and X/100, so ``50\\%`` matches ``50``
  and ``0.5``; ``0.5`` without a percent sign does not match ``50``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Answer:
    latex: str  # normalised answer, percent sign removed
    percent: bool  # the answer was written with a percent sign

    def variants(self) -> list[str]:
        """LaTeX forms the answer may stand for (X% stands for X and X/100)."""
        if not self.percent:
            return [self.latex]
        return [self.latex, "\\frac{" + self.latex + "}{100}"]


_SUBS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"\\[dtc]frac(?![A-Za-z])", r"\\frac"),
        (r"\\displaystyle(?![A-Za-z])", ""),
        (r"\\(?:left|right)\s*\.", ""),  # invisible delimiters
        (r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![A-Za-z])", ""),
        (r"(?<=\d)(?:\\[,;:! ]|~|\{,\})(?=\d{3}(?!\d))", ""),  # 1\,000 -> 1000
        (r"\\[,;:!]|~|\\ ", " "),
        # degrees
        (r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\degree(?:s)?(?![A-Za-z])|°", ""),
        (r"\\text\{\s*(?:degrees?)?\s*\}", ""),
    ]
]

_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*\\?%\s*\}|\\text\{\s*percent\s*\}|percent)\s*$")
_CURRENCY = re.compile(r"^(?:\\\$|\$|\\text\{\s*\\?\$\s*\})\s*")
_NUMBER = r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+|\\frac\{-?\d+\}\{\d+\})"
_UNIT_TEXT = re.compile(
    r"^(?P<num>.*?[\d}.])\s*\\(?:text|mbox|textrm|mathrm)\s*\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?$"
)
_UNIT_WORDS = re.compile(rf"^(?P<num>{_NUMBER})\s+(?:[A-Za-z]{{2,}}\.?\s*)+(?:\^\{{?\d\}}?)?$")
_GROUPED = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_WRAPPER = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mbox)\s*\{(?P<body>[^{}]*)\}$")


def normalize(raw: str) -> Answer:
    s = raw.strip().strip("$").strip()
    for pattern, repl in _SUBS:
        s = pattern.sub(repl, s)
    s = s.strip()
    s = _CURRENCY.sub("", s)
    percent = False
    m = _PERCENT.search(s)
    if m and m.start() > 0:
        s, percent = s[: m.start()], True
    for _ in range(2):  # "5\text{ m}\text{ s}" style double units
        m = _UNIT_TEXT.match(s) or _UNIT_WORDS.match(s)
        if m:
            s = m.group("num").strip()
    s = _CURRENCY.sub("", s).rstrip(".").strip() or s
    if _GROUPED.match(s):
        s = s.replace(",", "")
    return Answer(" ".join(s.split()), percent)


_EXACT = re.compile(r"^(?P<sign>-)?(?:(?P<int>\d+)|(?P<dec>\d*\.\d+)|\\frac\{(?P<n>\d+)\}\{(?P<d>\d+)\}|(?P<a>\d+)/(?P<b>\d+))$")


def exact_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, written_as_decimal) for a plain integer / decimal / fraction, else None."""
    m = _EXACT.match(s.replace(" ", ""))
    if m is None:
        return None
    if m["int"] is not None:
        v = Fraction(int(m["int"]))
    elif m["dec"] is not None:
        v = Fraction(m["dec"])
    else:
        num, den = (m["n"], m["d"]) if m["n"] is not None else (m["a"], m["b"])
        if int(den) == 0:
            return None
        v = Fraction(int(num), int(den))
    return (-v if m["sign"] else v), m["dec"] is not None


def plain_text(raw: str) -> str | None:
    """Lower-cased words when the answer is text ("Monday", ``\\text{blue}``), else None.

    Text means letters, spaces, hyphens and apostrophes only, with a word of three
    or more letters (or an explicit ``\\text{}``): ``ab`` stays maths (a times b).
    """
    s = raw.strip().strip("$").strip().rstrip(".")
    wrapped = False
    m = _WRAPPER.match(s)
    if m:
        s, wrapped = m.group("body").strip().rstrip("."), True
    if not re.fullmatch(r"[A-Za-z][A-Za-z\s'\-]*", s):
        return None
    if not wrapped and not re.search(r"[A-Za-z]{3,}", s):
        return None
    return " ".join(s.lower().split())
