"""Problems and SFT pairs from data files, and JSONL written atomically.

Accepts AReaL's layout (one problem per line)::

    {"query_id": "...", "prompt": "...", "solutions": ["... \\boxed{42}"]}
    {"id": 7, "question": "...", "answer": 42}

Each entry of `Problem.answers` is a reference for the verifier: a bare answer or a solution text whose
last \\boxed{} holds the answer. A malformed line is a `DatasetError` naming file:line and the fault;
with `skip_malformed=True` it is skipped, logged and counted in the result's `.stats`.

Other layouts (a GSM8K or MATH dump, any column names) are read through a `Layout` (the `data.*_key`
and `data.answer_format` config keys); JSON, parquet, arrow files and saved dataset directories go
through the `datasets` library (policies.data.table_data), JSONL stays on this line-by-line reader so its
errors keep naming file:line. The records and errors live in policies.data.records and are re-exported
here, so a caller of the loaders needs one import.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from policies.data.records import DatasetError, Layout, LoadStats, Problem, Records, RowError, SFTChat, SFTPair
from policies.data.rows import Parse, problem_parser, read_rows, sft_pair
from policies.data.table_data import TABLE_SUFFIXES, load_table_problems

__all__ = ["DatasetError", "Layout", "LoadStats", "Problem", "Records", "SFTChat", "SFTPair", "TABLE_SUFFIXES",
           "load_problems", "load_sft_pairs", "write_jsonl"]


def _json_object(line: bytes) -> dict:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise RowError(f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RowError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_jsonl(path: str | os.PathLike, parse: Parse, *, skip_malformed: bool) -> Records:
    """Run `parse(obj, where, lineno)` over every non-blank line, with the shared error rules."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DatasetError(f"{p}: cannot read: {e.strerror or e}") from None
    rows = ((f"{p}:{n}", n, lambda line=line: _json_object(line))
            for n, line in enumerate(data.split(b"\n"), 1) if line.strip())
    return read_rows(rows, parse, source=p, unit="line", skip_malformed=skip_malformed)


def load_problems(path: str | os.PathLike, *, skip_malformed: bool = False, layout: Layout | None = None) -> Records:
    """Problems from JSONL (or, by suffix, JSON / parquet / arrow, or a saved dataset directory: those go
    through `datasets`); the result is a list of `Problem` with a `.stats` (`LoadStats`)."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() in TABLE_SUFFIXES:
        return load_table_problems(p, layout or Layout(), skip_malformed=skip_malformed)
    return _read_jsonl(p, problem_parser(p.name, layout), skip_malformed=skip_malformed)


def load_sft_pairs(path: str | os.PathLike, *, skip_malformed: bool = False) -> Records:
    """(prompt, response) pairs from JSONL (`prompt`/`question`/`problem`, `response`/`completion`); a line
    with `messages` (OpenAI's chat shape, ending in an assistant turn) is an `SFTChat` instead."""
    return _read_jsonl(path, sft_pair, skip_malformed=skip_malformed)


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
