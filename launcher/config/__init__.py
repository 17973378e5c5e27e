"""launcher/config: the experiment config, YAML in and validated dataclasses out.

schema.py declares the sections (each a `policies.settings.Checked` dataclass; the math's own sections
come from `policies`), yaml_io.py reads and writes YAML with ``dotted.key=value`` overrides, printer.py
prints the effective config, flags.py turns section fields into command-line flags. Everything is
checked here at the edge, so the actors can trust their settings; every error names the dotted key.
May import `policies` and `actors.protocol` (the role names); nothing else of the launcher.

The names most code needs are here: ``from launcher.config import ExperimentConfig, ConfigError, load_config``.
"""
from launcher.config.schema import ConfigError, ExperimentConfig, check_trainable, describe_mode, describe_recipe
from launcher.config.yaml_io import config_to_yaml, dump_config, load_config

__all__ = ["ConfigError", "ExperimentConfig", "check_trainable", "config_to_yaml", "describe_mode", "describe_recipe",
           "dump_config",
           "load_config"]
