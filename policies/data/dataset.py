"""Problems and SFT pairs from JSONL, and the chat prompt the model sees.

Accepts AReaL's layout (one problem per line)::

    {"query_id": "...", "prompt": "...", "solutions": ["... \\boxed{42}"]}
    {"id": 7, "question": "...", "answer": 42}

Each entry of `Problem.answers` is a reference for the verifier: a bare answer or a solution text whose
last \\boxed{} holds the answer. A malformed line is a `DatasetError` naming file:line and the fault;
with `skip_malformed=True` it is skipped, logged and counted in the result's `.stats`.

Other layouts (a GSM8K or MATH dump, any column names) are read through a `Layout` (the `data.*_key`
and `data.answer_format` config keys); JSON, parquet, arrow files and saved dataset directories go
through the `datasets` library (policies.data.table_data), JSONL stays on this line-by-line reader so its
errors keep naming file:line.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import orjson

from policies.data.answers import FORMATS

log = logging.getLogger(__name__)

PROMPT_KEYS = ("prompt", "question", "problem")
ID_KEYS = ("query_id", "id")
RESPONSE_KEYS = ("response", "completion")
_LOGGED_SKIPS = 10     # per file; the rest only counted


class DatasetError(ValueError):
    """A malformed dataset file or line; the message names file:line and what is wrong."""


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answers: list[str]
    # the row's other fields, for reward functions (reward.fns); not part of a problem's identity
    extra: dict = field(default_factory=dict, compare=False, repr=False)


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


class SFTPair(NamedTuple):
    prompt: str
    response: str


@dataclass
class LoadStats:
    lines: int = 0             # non-blank lines read
    loaded: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)   # one message per skipped line

    def malformed(self, msg: str, *, skip: bool, unit: str) -> None:
        """A bad record: DatasetError(msg), or (skipping malformed records) counted and the first few logged."""
        if not skip:
            raise DatasetError(msg) from None  # the parse error is in the message
        self.skipped += 1
        self.errors.append(msg)
        if self.skipped <= _LOGGED_SKIPS:
            log.warning("skipping malformed %s %s", unit, msg)


class Records(list):
    """A list of loaded records that also carries the `LoadStats` of the load."""

    stats: LoadStats


class _Bad(Exception):
    """One line's fault, without the file:line prefix."""


def _first(obj: dict, keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for k in keys:
        if k in obj:
            return k, obj[k]
    return None, None


def _text(obj: dict, keys: tuple[str, ...], what: str) -> str:
    key, value = _first(obj, keys)
    if key is None:
        raise _Bad(f"missing {what} (expected one of the keys {', '.join(map(repr, keys))})")
    if not isinstance(value, str):
        raise _Bad(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Bad(f"{key!r} is empty")
    return value


def _answers(obj: dict, layout: Layout | None = None) -> list[str]:
    """The references of a row, read through `layout` (None: AReaL's keys, answers as they are)."""
    from policies.data.answers import reference_answers
    if layout is not None and layout.answer_key is not None:
        if layout.answer_key not in obj:
            raise _Bad(f"missing reference: no key {layout.answer_key!r} (data.answer_key)")
        return reference_answers(obj[layout.answer_key], layout.answer_format, layout.answer_key)
    answers = _areal_answers(obj)
    if layout is None or layout.answer_format == "raw":
        return answers
    return reference_answers(answers, layout.answer_format, "solutions" if "solutions" in obj else "answer")


def _areal_answers(obj: dict) -> list[str]:
    if "solutions" in obj:
        sols = obj["solutions"]
        if not isinstance(sols, list) or not sols:
            raise _Bad(f"'solutions' must be a non-empty list of strings, got {sols!r:.80}")
        for i, s in enumerate(sols):
            if not isinstance(s, str) or not s.strip():
                raise _Bad(f"'solutions'[{i}] must be a non-empty string, got {s!r:.80}")
        return list(sols)
    if "answer" in obj:
        a = obj["answer"]
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise _Bad(f"'answer' must be a string or a number, got {type(a).__name__}")
        if isinstance(a, str) and not a.strip():
            raise _Bad("'answer' is empty")
        return [a if isinstance(a, str) else repr(a)]
    raise _Bad("missing reference (expected 'solutions' or 'answer')")


def _read_jsonl(path: str | os.PathLike, parse: Callable[[dict, str, int], Any], *,
                skip_malformed: bool) -> Records:
    """Run `parse(obj, where, lineno)` over every non-blank line, with the shared error rules."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DatasetError(f"{p}: cannot read: {e.strerror or e}") from None
    out, stats = Records(), LoadStats()
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        stats.lines += 1
        where = f"{p}:{lineno}"
        try:
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise _Bad(f"not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise _Bad(f"expected a JSON object, got {type(obj).__name__}")
            out.append(parse(obj, where, lineno))
        except _Bad as e:
            stats.malformed(f"{where}: {e}", skip=skip_malformed, unit="line")
    stats.loaded = len(out)
    if stats.skipped:
        log.warning("%s: skipped %d of %d lines as malformed", p, stats.skipped, stats.lines)
    if not out:
        detail = f" ({stats.skipped} malformed lines skipped)" if stats.skipped else ""
        raise DatasetError(f"{p}: no records{detail}")
    out.stats = stats
    return out


def problem_parser(name: str, layout: Layout | None, unit: str = "line") -> Callable[[dict, str, int], Problem]:
    """A row -> `Problem` parser with the shared rules (keys by `layout`, unique ids; a row without an id
    is called `name:N`); raises `_Bad` with the row's fault. `unit` names a row in duplicate-id messages."""
    first: dict[str, int] = {}
    lay = layout or Layout()
    prompt_keys = (lay.prompt_key,) if lay.prompt_key else PROMPT_KEYS
    id_keys = (lay.id_key,) if lay.id_key else ID_KEYS

    def parse(obj: dict, where: str, n: int) -> Problem:
        try:
            prompt = _text(obj, prompt_keys, "prompt")
            answers = _answers(obj, layout)
        except _Bad as e:
            if str(e).startswith("missing"):
                raise _Bad(f"{e}; the row has {', '.join(map(repr, obj)) or 'no keys'}") from None
            raise
        key, qid = _first(obj, id_keys)
        if key is None:
            if lay.id_key:
                raise _Bad(f"missing id: no key {lay.id_key!r} (data.id_key); the row has {', '.join(map(repr, obj))}")
            qid = f"{name}:{n}"
        elif isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise _Bad(f"{key!r} must be a string or an integer, got {type(qid).__name__}")
        qid = str(qid)
        if not qid:
            raise _Bad(f"{key!r} is empty")
        if qid in first:
            raise _Bad(f"duplicate id {qid!r} (first at {unit} {first[qid]})")
        first[qid] = n
        used = {k for k in (*prompt_keys, *id_keys) if k in obj}
        used.update((lay.answer_key,) if lay.answer_key else ("solutions", "answer"))
        return Problem(qid, prompt, answers, extra={k: _plain(v) for k, v in obj.items() if k not in used})

    return parse


def _plain(v: Any) -> Any:
    """A value that travels in a bus message (msgpack): JSON-like types as they are, anything else as str."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


TABLE_SUFFIXES = (".json", ".parquet", ".arrow")


def load_problems(path: str | os.PathLike, *, skip_malformed: bool = False, layout: Layout | None = None) -> Records:
    """Problems from JSONL (or, by suffix, JSON / parquet / arrow, or a saved dataset directory: those go
    through `datasets`); the result is a list of `Problem` with a `.stats` (`LoadStats`)."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() in TABLE_SUFFIXES:
        from policies.data.table_data import load_table_problems
        return load_table_problems(p, layout or Layout(), skip_malformed=skip_malformed)
    return _read_jsonl(p, problem_parser(p.name, layout), skip_malformed=skip_malformed)


def load_sft_pairs(path: str | os.PathLike, *, skip_malformed: bool = False) -> Records:
    """(prompt, response) pairs from JSONL (`prompt`/`question`/`problem`, `response`/`completion`)."""
    def parse(obj: dict, where: str, lineno: int) -> SFTPair:
        return SFTPair(_text(obj, PROMPT_KEYS, "prompt"), _text(obj, RESPONSE_KEYS, "response"))

    return _read_jsonl(path, parse, skip_malformed=skip_malformed)


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """Write records (dicts or dataclasses) one per line, atomically: readers see the old file or the new."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for r in records:
                f.write(orjson.dumps(r._asdict() if isinstance(r, tuple) and hasattr(r, "_asdict") else r))
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
