"""Rows into records: the per-row parsers and the one loop that applies them to a file's rows.

A row is a dict (a JSONL line, a table row). `problem_parser` makes a `Problem` of it by a `Layout`
(AReaL's keys when none); `sft_pair` makes an `SFTPair`. Each raises `RowError` with the row's fault;
`read_rows` adds where the row is and either raises `DatasetError` or skips, counts and logs it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Callable

from policies.data.answers import AnswerFieldError, reference_answers
from policies.data.records import DatasetError, Layout, LoadStats, Problem, Records, RowError, SFTChat, SFTPair

log = logging.getLogger(__name__)

PROMPT_KEYS = ("prompt", "question", "problem")
ID_KEYS = ("query_id", "id")
RESPONSE_KEYS = ("response", "completion")

Parse = Callable[[dict, str, int], Any]


def read_rows(rows: Iterable[tuple[str, int, Callable[[], dict]]], parse: Parse, *, source: Any, unit: str,
              skip_malformed: bool, empty_note: str = "") -> Records:
    """`parse(row(), where, n)` for every `(where, n, row)`: a `RowError` is a `DatasetError` naming `where`,
    or (`skip_malformed`) counted in the result's `.stats` and the first few logged. No record at all is a
    `DatasetError` naming `source`; `empty_note` is added to it when there was no row."""
    out, stats = Records(), LoadStats()
    for where, n, row in rows:
        stats.lines += 1
        try:
            out.append(parse(row(), where, n))
        except RowError as e:
            stats.malformed(f"{where}: {e}", skip=skip_malformed, unit=unit)
    stats.loaded = len(out)
    if stats.skipped:
        log.warning("%s: skipped %d of %d %ss as malformed", source, stats.skipped, stats.lines, unit)
    if not out:
        detail = f" ({stats.skipped} malformed {unit}s skipped)" if stats.skipped else ""
        raise DatasetError(f"{source}: no records{detail}{'' if stats.lines else empty_note}")
    out.stats = stats
    return out


def _first(obj: dict, keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for k in keys:
        if k in obj:
            return k, obj[k]
    return None, None


def _text(obj: dict, keys: tuple[str, ...], what: str) -> str:
    key, value = _first(obj, keys)
    if key is None:
        raise RowError(f"missing {what} (expected one of the keys {', '.join(map(repr, keys))})")
    if not isinstance(value, str):
        raise RowError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"{key!r} is empty")
    return value


def _answers(obj: dict, layout: Layout | None = None) -> list[str]:
    """The references of a row, read through `layout` (None: AReaL's keys, answers as they are)."""
    try:
        if layout is not None and layout.answer_key is not None:
            if layout.answer_key not in obj:
                raise RowError(f"missing reference: no key {layout.answer_key!r} (data.answer_key)")
            return reference_answers(obj[layout.answer_key], layout.answer_format, layout.answer_key)
        answers = _areal_answers(obj)  # through the format even when raw: GSM8K solutions there are refused
        return reference_answers(answers, "raw" if layout is None else layout.answer_format,
                                 "solutions" if "solutions" in obj else "answer")
    except AnswerFieldError as e:
        raise RowError(str(e)) from None


def _areal_answers(obj: dict) -> list[str]:
    if "solutions" in obj:
        sols = obj["solutions"]
        if not isinstance(sols, list) or not sols:
            raise RowError(f"'solutions' must be a non-empty list of strings, got {sols!r:.80}")
        for i, s in enumerate(sols):
            if not isinstance(s, str) or not s.strip():
                raise RowError(f"'solutions'[{i}] must be a non-empty string, got {s!r:.80}")
        return list(sols)
    if "answer" in obj:
        a = obj["answer"]
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise RowError(f"'answer' must be a string or a number, got {type(a).__name__}")
        if isinstance(a, str) and not a.strip():
            raise RowError("'answer' is empty")
        return [a if isinstance(a, str) else repr(a)]
    raise RowError("missing reference (expected 'solutions' or 'answer')")


def problem_parser(name: str, layout: Layout | None, unit: str = "line") -> Parse:
    """A row -> `Problem` parser with the shared rules (keys by `layout`, unique ids; a row without an id
    is called `name:N`); raises `RowError` with the row's fault. `unit` names a row in duplicate-id messages."""
    first: dict[str, int] = {}
    lay = layout or Layout()
    prompt_keys = (lay.prompt_key,) if lay.prompt_key else PROMPT_KEYS
    id_keys = (lay.id_key,) if lay.id_key else ID_KEYS

    def parse(obj: dict, where: str, n: int) -> Problem:
        try:
            prompt = _text(obj, prompt_keys, "prompt")
            answers = _answers(obj, layout)
        except RowError as e:
            if str(e).startswith("missing"):
                raise RowError(f"{e}; the row has {', '.join(map(repr, obj)) or 'no keys'}") from None
            raise
        key, qid = _first(obj, id_keys)
        if key is None:
            if lay.id_key:
                raise RowError(f"missing id: no key {lay.id_key!r} (data.id_key); "
                               f"the row has {', '.join(map(repr, obj))}")
            qid = f"{name}:{n}"
        elif isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise RowError(f"{key!r} must be a string or an integer, got {type(qid).__name__}")
        qid = str(qid)
        if not qid:
            raise RowError(f"{key!r} is empty")
        if qid in first:
            raise RowError(f"duplicate id {qid!r} (first at {unit} {first[qid]})")
        first[qid] = n
        used = {k for k in (*prompt_keys, *id_keys) if k in obj}
        used.update((lay.answer_key,) if lay.answer_key else ("solutions", "answer"))
        return Problem(qid, prompt, answers, extra={k: _plain(v) for k, v in obj.items() if k not in used})

    return parse


CHAT_ROLES = ("system", "user", "assistant")


def sft_pair(obj: dict, where: str, n: int) -> SFTPair | SFTChat:
    """A row -> `SFTPair` (`prompt`/`question`/`problem`, `response`/`completion`), or `SFTChat` when the
    row has `messages` (a conversation in OpenAI's chat shape)."""
    if "messages" in obj:
        return sft_chat(obj["messages"])
    return SFTPair(_text(obj, PROMPT_KEYS, "prompt"), _text(obj, RESPONSE_KEYS, "response"))


def sft_chat(messages: Any) -> SFTChat:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"'messages' must be a non-empty list of {{role, content}} objects, got {messages!r:.60}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RowError(f"messages[{i}]: expected an object with 'role' and 'content', got {m!r:.60}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise RowError(f"messages[{i}].role: expected one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RowError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise RowError("messages: the last turn must be the assistant's (what SFT trains on), "
                       f"got {out[-1]['role']!r}")
    return SFTChat(out)


def _plain(v: Any) -> Any:
    """A value that travels in a bus message (msgpack): JSON-like types as they are, anything else as str."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)
