"""Dataclass configs: building them from dicts / TOML / JSON files and ``--section.field value`` overrides.

Each stage has its own dataclass (fields documented in place, units in their names, checks in
``__post_init__``); nested dataclasses compose into a root config. These helpers are generic over them.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from DiffusionSegLib.errors import UserInputError

__all__ = ["config_to_dict", "config_from_dict", "load_config_file", "apply_overrides", "parse_override_args"]

T = TypeVar("T")


def config_to_dict(config: Any, omit_at_default: tuple[str, ...] = ()) -> dict:
    """A JSON-ready dict of a (nested) dataclass config; tuples become lists. Fields named in
    ``omit_at_default`` are left out while they hold their default, so records (reuse keys, snapshots) made
    before those fields existed still compare equal."""
    data = json.loads(json.dumps(dataclasses.asdict(config)))
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name in omit_at_default:
        if getattr(config, name) == defaults[name]:
            del data[name]
    return data


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, dict):
            raise UserInputError(f"config {where}: expected a section (table), got {value!r}")
        return config_from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        for option in options:
            try:
                return _coerce(value, option, where)
            except (UserInputError, TypeError, ValueError):
                continue
        raise UserInputError(f"config {where}: {value!r} does not fit {annotation}")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise UserInputError(f"config {where}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise UserInputError(f"config {where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise UserInputError(f"config {where}: expected {len(args)} values, got {list(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if origin is list:
        (arg,) = typing.get_args(annotation) or (Any,)
        if not isinstance(value, list | tuple):
            raise UserInputError(f"config {where}: expected a list, got {value!r}")
        return [_coerce(v, arg, where) for v in value]
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise UserInputError(f"config {where}: expected true or false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, bool):
            raise UserInputError(f"config {where}: expected a number, got {value!r}")
        try:
            number = annotation(value)
        except (TypeError, ValueError):
            raise UserInputError(f"config {where}: expected a number, got {value!r}") from None
        if annotation is int and float(value) != number:
            raise UserInputError(f"config {where}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        return str(value)
    return value


def config_from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are refused, missing ones keep defaults."""
    types_by_name = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserInputError(f"config {where or cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {key: _coerce(value, types_by_name[key], f"{where}.{key}".lstrip(".")) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise UserInputError(f"config {where or cls.__name__}: {error}") from None


def load_config_file(path: str | Path) -> dict:
    """Read a config as a dict from ``.toml`` or ``.json``."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"config file not found: {path}")
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(path.read_text())
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"config file {path} is not valid: {error}") from None
    raise UserInputError(f"config file {path}: expected a .toml or .json file")


def parse_override_args(tokens: list[str]) -> dict:
    """Turn ``["--training.steps", "100", "--model.base_channels=8"]`` into a nested dict of raw values.

    Values are parsed as JSON where they can be (numbers, booleans, lists), else kept as strings.
    """
    nested: dict = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--"):
            raise UserInputError(f"unexpected argument {token!r}; overrides look like --section.field VALUE")
        key, sep, raw = token[2:].partition("=")
        if not sep:
            if index + 1 >= len(tokens):
                raise UserInputError(f"override {token} has no value")
            raw = tokens[index + 1]
            index += 1
        index += 1
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = nested
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return nested


def apply_overrides(data: dict, overrides: dict) -> dict:
    """Deep-merge ``overrides`` into ``data`` (returns a new dict)."""
    merged = dict(data)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = apply_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged
