"""The experiment config in and out of YAML: the loader, ``dotted.key=value`` overrides, the dumper.

`load_config` is the one way a config is read (file, then overrides, then `from_dict` checks it all);
`dump_config` / `config_to_yaml` write one back that loads into an equal config (each run's
RUN_DIR/config.yaml, which every actor process reads).
"""
from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml

from launcher.config.schema import ExperimentConfig
from policies.settings import ConfigError, from_dict, to_dict


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-5 as a float (YAML 1.1 needs a dot) and rejects duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


class _DuplicateKey(Exception):
    """Line and message; `parse_yaml` adds the source name."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise _DuplicateKey(f"{key_node.start_mark.line + 1}: duplicate key {key!r} "
                                f"(first at line {seen[key] + 1})")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else None
    except _DuplicateKey as e:
        raise ConfigError(f"{source}:{e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None


def apply_override(data: dict, override: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is read as YAML (so 3, true, null, [a, b])."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    value = parse_yaml(raw, f"override {override!r}") if raw.strip() else None
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def read_text(path: str | Path, what: str, error: type[Exception] = ConfigError) -> str:
    """A UTF-8 file's text, or `error` naming the file and `what` it should have been (a config, a hostfile)."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{p}: cannot read {what}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{p}: not UTF-8 text: {e}") from None


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """Read the YAML at `path` (None = all defaults), apply the overrides, validate."""
    data: Any = {}
    if path is not None:
        data = parse_yaml(read_text(path, "config"), str(path))
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {data!r}")
    for o in overrides:
        apply_override(data, o)
    return from_dict(ExperimentConfig, data)


def dump_config(cfg: ExperimentConfig) -> dict:
    """Plain data that `from_dict(ExperimentConfig, ...)` turns back into an equal config."""
    return to_dict(cfg)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists inline ([0.9, 0.999]): reads like configs/example.yaml."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.dump(dump_config(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)

