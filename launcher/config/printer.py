"""The one config printer: `python -m launcher config` and `python -m launcher.config` both print through it."""
from __future__ import annotations

import sys
import typing
from pathlib import Path

from launcher.config.schema import ConfigError, ExperimentConfig, describe_mode, describe_recipe
from launcher.config.yaml_io import config_to_yaml, load_config


def show(cfg: ExperimentConfig) -> str:
    """The effective config: the asynchrony mode (users confuse the settings), the recipe, then the YAML."""
    return f"# mode: {describe_mode(cfg)}\n# recipe: {describe_recipe(cfg)}\n{config_to_yaml(cfg)}"


def print_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> int:
    """Print the effective config of `path` (None = the defaults) with `overrides`; 2 on a bad config."""
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(show(cfg), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m launcher.config [config.yaml] [key=value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = argv.pop(0) if argv and "=" not in argv[0] else None
    return print_config(path, argv)
