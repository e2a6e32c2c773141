"""Typed configuration: YAML files validated against dataclasses with a default for every key.

A config file may name a base with ``extends: other.yaml`` (relative to the file); the command
line overrides any key with ``--set a.b=value`` (the value is parsed as YAML: ``[512,512]``,
``1e-3``, ``true``). Every mistake raises ``ConfigError`` with one line naming the key or file.
``schema.py`` holds the sections and their rules, ``loading.py`` the reading.
"""

from retinanet_xla.config.loading import all_keys, load_config, parse_override, save_config
from retinanet_xla.config.schema import *  # noqa: F403 - the schema is this package's public face
from retinanet_xla.config.schema import __all__ as _schema_names
from retinanet_xla.errors import ConfigError

__all__ = ["ConfigError", "all_keys", "load_config", "parse_override", "save_config", *_schema_names]
