"""Validated settings dataclasses: the one idiom of every config section (launcher, PPO, SFT, eval, reward, sim).

It lives at the bottom of the tree, in `policies`, because the sections it checks are declared where
their code lives (`policies.train.ppo.PPOConfig`, `policies.verify.reward.RewardConfig`, ...) and
`policies` imports nothing above it; the launcher's schema nests them all. Imports nothing of ours.

A section is a ``@dataclass`` that inherits `Checked`; a field with a range check, a unit or a help
line is declared with `opt`. Direct construction converts and checks every field (an int for a float
becomes a float, a list for a tuple a tuple) and raises `FieldError`; `from_dict` does the same for
plain data (from YAML) and raises `ConfigError` naming the dotted key, what was expected and what was
given, e.g. ``rollout.top_p: expected a number in (0, 1], got 'abc'``; an unknown key names the
closest known one. Checks that span fields go in `check()`, raising `FieldError` with the key.

Types understood: nested dataclasses, Optional/unions, Literal, bool, int, float, str, list[X],
tuple[X, Y], tuple[X, ...], dict[str, X], Any.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import field
from typing import Any, Callable, Literal, Union


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


class FieldError(ValueError):
    """One field's bad value, raised while a section is built; `from_dict` prefixes the dotted path."""

    def __init__(self, key: str, expected: str, value: Any):
        self.key, self.expected, self.value = key, expected, value
        super().__init__(f"{key}: expected {expected}, got {value!r}")


# ----------------------------------------------------------------------------- declaring fields

def opt(default: Any = dataclasses.MISSING, *, check: Callable[[Any], bool] | None = None,
        expect: str = "", factory: Callable[[], Any] | None = None, doc: str = "") -> Any:
    """A field with an optional range check; `expect` completes "expected <type> ..." in its error;
    `doc` is its help (command-line flags derived from the field show it)."""
    meta = {"check": check, "expect": expect, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def positive(v) -> bool: return v is None or v > 0
def non_negative(v) -> bool: return v is None or v >= 0
def at_least_one(v) -> bool: return v is None or v >= 1
def unit_interval(v) -> bool: return v is None or 0 < v <= 1
def closed_unit(v) -> bool: return v is None or 0 <= v <= 1


class Checked:
    """Mixin: converts and range-checks every field after construction, then runs `check()`."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                converted = _convert(hints[f.name], value, f.name, f)
            except ConfigError:
                raise FieldError(f.name, expected(hints[f.name], f), value) from None
            if converted is not value:
                object.__setattr__(self, f.name, converted)   # frozen sections too
            check = f.metadata.get("check")
            if check is not None and not _safe(check, converted):
                raise FieldError(f.name, expected(hints[f.name], f), value)
        self.check()

    def check(self) -> None:
        """Checks that span fields; raise `FieldError` (its key may be dotted below this section)."""


def _safe(check: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(check(value))
    except TypeError:
        return False


# ----------------------------------------------------------------------------- describing types

@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of a settings dataclass."""
    return _hints(cls)


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "anything",
          type(None): "null"}
_PLURAL = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def describe(tp: Any) -> str:
    """The expected type in words, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _WORDS:
        return _WORDS[tp]
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        s = " or ".join(describe(a) for a in args if a is not type(None))
        return s + " or null" if type(None) in args else s
    if origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} items ({', '.join(describe(a) for a in args)})"
    if origin is dict:
        return f"a mapping of {_plural(args[1])}" if args else "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    return _PLURAL.get(tp) or describe(tp)


def expected(tp: Any, f: dataclasses.Field | None) -> str:
    extra = f.metadata.get("expect", "") if f is not None else ""
    return f"{describe(tp)} {extra}".strip()


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ----------------------------------------------------------------------------- plain data in and out

def from_dict(cls: Any, data: Any, path: str = "") -> Any:
    """Convert plain data (from YAML) into `cls`, checking every value; raises `ConfigError`."""
    return _convert(cls, data, path, None)


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a settings dataclass; tuples become lists for YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _fail(path: str, tp: Any, f: dataclasses.Field | None, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{path or '<config>'}: expected {expected(tp, f)}, got {value!r}")


def _scalar(tp: Any, value: Any) -> bool:
    """Whether `value` is a `tp` as YAML gives it: a bool is not an int, an int is a float."""
    if isinstance(value, bool):
        return tp is bool
    return isinstance(value, (int, float) if tp is float else tp)


def _convert(tp: Any, value: Any, path: str, f: dataclasses.Field | None, shown: Any = None) -> Any:
    """`shown` is the type named in an error (the whole union when converting one of its members)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    shown = tp if shown is None else shown
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _convert_dataclass(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            _fail(path, shown, f, value)
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return _convert(members[0], value, path, f, shown)
        for a in members:
            try:
                return _convert(a, value, path, f)
            except ConfigError:
                pass
        _fail(path, shown, f, value)
    if origin is Literal:
        # type(...) is type(...) so that True does not pass for 1 nor 1 for 1.0
        if any(value == a and type(value) is type(a) for a in args):
            return value
        _fail(path, shown, f, value)
    if tp in (bool, int, float, str):
        if not _scalar(tp, value):
            _fail(path, shown, f, value)
        return float(value) if tp is float and type(value) is not float else value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(path, shown, f, value)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            out = [_convert(args[0] if args else Any, v, f"{path}[{i}]", None) for i, v in enumerate(value)]
            return out if origin is list else tuple(out)
        if len(value) != len(args):
            _fail(path, shown, f, value)
        return tuple(_convert(a, v, f"{path}[{i}]", None) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, shown, f, value)
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, path, None): _convert(vt, v, join(path, str(k)), None) for k, v in value.items()}
    raise TypeError(f"{path}: unsupported settings type {tp!r}")   # a programming error, not a user error


def _convert_dataclass(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}       # an empty YAML section ("ppo:") means all defaults
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<config>'}: expected {describe(cls)}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {join(path, close[0])!r}?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{join(path, str(key))}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], join(path, name), f)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{join(path, name)}: required, expected {expected(hints[name], f)}")
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{join(path, e.key)}: expected {e.expected}, got {e.value!r}") from None
