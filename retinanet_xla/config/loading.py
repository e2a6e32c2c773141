"""Reading a config: YAML files with ``extends`` chains, ``--set`` overrides, type conversion
against the schema, and every mistake as ``ConfigError`` with one line naming the key or file."""

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from retinanet_xla import storage
from retinanet_xla.config.schema import Config, InvalidValue
from retinanet_xla.errors import ConfigError, shown
from retinanet_xla.storage import Location


def all_keys(cls=Config, prefix: str = "") -> List[str]:
    """Every leaf key, dotted: ``data.train.annotations``, ..."""
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        hint = typing.get_type_hints(cls)[f.name]
        keys += all_keys(hint, name + ".") if dataclasses.is_dataclass(hint) else [name]
    return keys


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown config key '{key}'{hint}")


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = typing.get_args(hint)
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        return names + (" or null" if type(None) in args else "")
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if origin in (dict, Dict):
        return f"a mapping of names to {_type_name(typing.get_args(hint)[1])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


MAX_CONFIG_BYTES = 2**20  # the shipped configs are 2-4 KB
MAX_INTEGER = 2**53  # every count and size fits in int64 and in a JSON number with room to spare


def _convert(value, hint, key: str, where: str):
    origin = typing.get_origin(hint)
    wrong = _WrongType(where, key, hint, value)
    if origin is typing.Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):  # the first type the value fits
            try:
                return _convert(value, inner, key, where)
            except ConfigError:
                continue
        raise wrong
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise wrong
        (inner,) = typing.get_args(hint)
        return [_convert(v, inner, key, where) for v in value]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise wrong
        _, inner = typing.get_args(hint)
        # Keys are names; a YAML value such as 1 (a category id) is kept as its text.
        return {
            str(k): _convert(str(v) if inner is str and isinstance(v, int) else v, inner, f"{key}.{k}", where)
            for k, v in value.items()
        }
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        if abs(value) > MAX_INTEGER:
            raise ConfigError(f"{where}: {key} must be an integer of at most 2**53, got {shown(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise wrong
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise TypeError(f"unsupported config type {hint}")


class _WrongType(ConfigError):
    """A value that is not of its key's type, raised as ``_WrongType(where, key, hint, value)``:
    the message is built only when it is shown, and shortened (``shown``)."""

    def __str__(self) -> str:
        where, key, hint, value = self.args
        return f"{where}: {key} must be {_type_name(hint)}, got {shown(value)}"


def _build(cls, data: Dict[str, Any], prefix: str, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(prefix + str(key), where)
    values = {}
    for name in names & set(data):
        hint, key = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, data[name], key + ".", where)
        else:
            values[name] = _convert(data[name], hint, key, where)
    try:
        return cls(**values)
    except InvalidValue as error:  # the section's own validation names the field
        raise ConfigError(f"{where}: {prefix}{error}") from None


def _merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _nearest_config(path: Location) -> str:
    """``; did you mean X?`` for a local config file of a close name beside ``path`` (a
    ``.yml`` for a ``.yaml``, a typo), else nothing."""
    if storage.is_url(path):
        return ""
    folder = Path(path).parent
    try:
        names = [entry.name for entry in folder.iterdir() if entry.suffix in (".yaml", ".yml") and entry.is_file()]
    except OSError:
        return ""
    close = difflib.get_close_matches(Path(path).name, names, n=1, cutoff=0.8)  # a typo, .yml for .yaml
    return f"; did you mean {folder / close[0]}?" if close else ""


def _read_yaml(path: Location, chain: Sequence[str] = ()) -> Dict[str, Any]:
    """The file's mapping with its ``extends`` chain merged in (base first). ``extends`` is
    relative to the file that names it, or a URL of its own."""
    if not storage.is_file(path):
        raise ConfigError(f"{path}: config file does not exist{_nearest_config(path)}")
    identity = str(path) if storage.is_url(path) else str(Path(path).resolve())
    if identity in chain:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    size = storage.size(path)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes, more than a config file's {MAX_CONFIG_BYTES:,}")
    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    except RecursionError:  # [[[[... nested beyond what the parser's recursion can hold
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{line}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'extends' must be a file name, got {shown(base)}")
    target = storage.location(base) if storage.is_url(base) else storage.join(storage.parent(path), base)
    return _merge(_read_yaml(target, (*chain, identity)), data)


def parse_override(text: str) -> Dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": parsed value}}}``."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text}: expected key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    nested: Dict[str, Any] = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def load_config(
    path: Optional[Location] = None, overrides: Sequence[str] = (), base: Optional[Dict[str, Any]] = None, where: str = "defaults"
) -> Config:
    """The defaults, then the file (with its ``extends`` chain) or a stored ``base`` mapping
    (a checkpoint's config), then each ``--set`` override."""
    data: Dict[str, Any] = dict(base or {})
    if path is not None:
        data = _read_yaml(storage.location(path))
        where = str(path)
    for text in overrides:
        data = _merge(data, parse_override(text))
    if overrides:
        where += " with --set " + " ".join(overrides)
    return _build(Config, data, "", where)


def save_config(config: Config, path: Location) -> None:
    storage.write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
