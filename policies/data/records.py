"""What a data file loads into, and the errors a load raises.

`Problem` (a prompt with its reference answers), `SFTPair` and `SFTChat` are the records; `Records` is the list a
loader returns, carrying the `LoadStats` of the load; `Layout` says where a row keeps its fields.
A row's fault is a `RowError` (without file:line); the loop that reads the rows (policies.data.rows)
turns it into a `DatasetError` naming file:line, or skips and counts the row.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

from policies.data.answers import FORMATS

log = logging.getLogger(__name__)

LOGGED_SKIPS = 10     # per file; the rest only counted


class DatasetError(ValueError):
    """A malformed dataset file or line; the message names file:line and what is wrong."""


class RowError(ValueError):
    """One row's fault, without the file:line prefix (the reading loop adds it)."""


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answers: list[str]
    # the row's other fields, for reward functions (reward.fns); not part of a problem's identity
    extra: dict = field(default_factory=dict, compare=False, repr=False)


class SFTPair(NamedTuple):
    prompt: str
    response: str


class SFTChat(NamedTuple):
    """A multi-turn conversation (`messages`: {role, content} dicts, roles system/user/assistant, the last
    an assistant turn): SFT trains on the assistant turns only."""
    messages: list[dict]


@dataclass(frozen=True)
class Layout:
    """Where a row keeps its prompt, reference answer and id, and how to read the answer.

    None keys mean AReaL's layout (prompt/question/problem, solutions/answer, query_id/id).
    `answer_format`: raw (as is: a bare answer, or a solution whose last \\boxed{} holds it),
    boxed (the last \\boxed{} content: MATH's `solution`), gsm8k (the text after "####").
    `split`: which split of a saved DatasetDict directory.
    """
    prompt_key: str | None = None
    answer_key: str | None = None
    id_key: str | None = None
    answer_format: str = "raw"
    split: str = "train"

    def __post_init__(self) -> None:
        if self.answer_format not in FORMATS:
            raise ValueError(f"answer_format={self.answer_format!r}: must be one of {', '.join(FORMATS)}")


@dataclass
class LoadStats:
    lines: int = 0             # rows read (non-blank lines of a JSONL file)
    loaded: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)   # one message per skipped row

    def malformed(self, msg: str, *, skip: bool, unit: str) -> None:
        """A bad record: DatasetError(msg), or (skipping malformed records) counted and the first few logged."""
        if not skip:
            raise DatasetError(msg) from None  # the parse error is in the message
        self.skipped += 1
        self.errors.append(msg)
        if self.skipped <= LOGGED_SKIPS:
            log.warning("skipping malformed %s %s", unit, msg)


class Records(list):
    """A list of loaded records that also carries the `LoadStats` of the load."""

    stats: LoadStats
