"""Command-line flags derived from config fields, so a knob's name, type, default and help are written once.

`add_flags(parser, EvalConfig, "k", "temperature")` gives ``-k`` and ``--temperature`` with the
field's default and `doc`; `settings_from(args, EvalConfig, ...)` builds the section back from the
parsed flags, checked as the YAML is, its errors naming the flag (``-k: expected an integer >= 1, got 0``).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal

from policies.settings import FieldError, field_types


def flag(name: str) -> str:
    return f"-{name}" if len(name) == 1 else "--" + name.replace("_", "-")


def _choices(tp: Any) -> list | None:
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    return _choices(members[0]) if len(members) == 1 else None


def _scalar(tp: Any) -> type:
    members = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return members[0] if members[0] in (int, float, str) else str


def add_flags(parser: argparse.ArgumentParser, cls: type, *names: str, **defaults: Any) -> None:
    """One flag per field `names` of `cls`; `defaults` replaces a field's default for this command only."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = field_types(cls)
    for name in names:
        f, tp = fields[name], types[name]
        default = defaults.get(name, f.default)
        doc = f.metadata.get("doc", "") if f.metadata else ""
        if tp is bool or (isinstance(default, bool) and bool in typing.get_args(tp)):
            parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=default,
                                help=doc or None)
            continue
        choices = _choices(tp)
        shown = f"{doc} " if doc else ""
        parser.add_argument(flag(name), dest=name, type=None if choices else _scalar(tp), choices=choices,
                            default=default, help=f"{shown}(default: %(default)s)")


def settings_from(args: argparse.Namespace, cls: type, *names: str, **given: Any) -> Any:
    """`cls` built from the parsed flags `names` (and `given` values); raises ValueError naming the flag."""
    try:
        return cls(**{n: getattr(args, n) for n in names}, **given)
    except FieldError as e:
        raise ValueError(f"{flag(e.key)}: expected {e.expected}, got {e.value!r}") from None
