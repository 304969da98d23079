"""Dataclasses as command-line flags and YAML keys: one helper for every CLI and recipe.

Each options or configuration dataclass maps 1:1 onto flags: field `act_order` of the options of
method `gptq` is `--gptq-act-order / --no-gptq-act-order` (a method's options live in its own
namespace, so two methods never share a flag or a default), field `lr` of TrainConfig is `--lr`.
Types come from `typing.get_type_hints`, so they are real types whether or not the module was
written with `from __future__ import annotations`; help comes from `field.metadata["help"]`.
Flags are only set when given (argparse.SUPPRESS), so a dataclass keeps its own defaults and the
caller can tell which flags the user gave, and refuse those that do not apply.
The same coercion reads YAML values: `1e-5` (a string to YAML 1.1) is a float for a float field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing

from ptq.errors import OptionsError

__all__ = ["field_types", "coerce", "add_dataclass_flags", "given_fields", "from_args",
           "from_mapping", "flag_name", "load_preset_config", "option"]


def option(default, help_text: str):
    """A config dataclass field with its flag's help (lists become tuples: frozen configs)."""
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata={"help": help_text})
    return dataclasses.field(default=default, metadata={"help": help_text})


def field_types(cls) -> dict[str, object]:
    """{field name: resolved type} of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp):
    """(inner type, optional?) of `X | None` / Optional[X]; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _item_type(tp):
    """The element type of tuple[X, ...] / list[X], or None if tp is not a sequence type."""
    if typing.get_origin(tp) in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return args[0] if args else str
    if tp in (tuple, list):
        return str
    return None


def _bad(where: str, what: str) -> OptionsError:
    return OptionsError(f"{where}: {what}" if where else what)


def _scalar(value, tp, where: str):
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _bad(where, f"{value!r} is not true or false; give true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise _bad(where, f"{value!r} is not an integer; give a whole number")
        try:
            return int(value)
        except ValueError:
            raise _bad(where, f"{value!r} is not an integer; give a whole number") from None
    if tp is float:
        if isinstance(value, bool):
            raise _bad(where, f"{value!r} is not a number; give a finite number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _bad(where, f"{value!r} is not a number; give a finite number") from None
        if not math.isfinite(number):
            raise _bad(where, f"{value!r} is not a finite number; give a finite number")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise _bad(where, f"{value!r} is not a string; give one value")
        return str(value)
    return value


def coerce(value, tp, where: str):
    """`value` (from YAML or a flag) as type `tp`; an OptionsError naming `where` otherwise."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise _bad(where, "a value is required")
    item = _item_type(tp)
    if item is not None:
        values = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_scalar(v, item, where) for v in values)
    return _scalar(value, tp, where)


def _flag_type(tp):
    """An argparse type converting one flag value with `_scalar`: a bad value becomes argparse's
    own one-line error (`argument --lr: 'nan' is not a finite number; ...`), not the bare
    'invalid value' argparse prints for a ValueError."""
    def convert(text):
        try:
            return _scalar(text, tp, "")
        except OptionsError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def flag_name(name: str, prefix: str = "") -> str:
    return "--" + (f"{prefix}-" if prefix else "") + name.replace("_", "-")


def _dest(name: str, prefix: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_dataclass_flags(parser, cls, *, prefix: str = "", exclude=(), defaults=None,
                        default_label: str = "default") -> list[str]:
    """One flag per field of `cls` on `parser` (a parser or an argument group); returns the
    flags. `defaults` overrides the defaults shown in the help (e.g. a preset's values)."""
    flags = []
    shown = {**{f.name: f.default for f in dataclasses.fields(cls)}, **(defaults or {})}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp, _ = _unwrap_optional(field_types(cls)[f.name])
        flag = flag_name(f.name, prefix)
        text = f"{f.metadata.get('help', f.name)} ({default_label}: {_show(shown[f.name])})"
        kwargs = dict(dest=_dest(f.name, prefix), default=argparse.SUPPRESS, help=text)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif _item_type(tp) is not None:
            parser.add_argument(flag, nargs="*", type=_flag_type(_item_type(tp)), **kwargs)
        else:
            parser.add_argument(flag, type=_flag_type(tp), **kwargs)
        flags.append(flag)
    return flags


def given_fields(cls, args, prefix: str = "") -> dict:
    """{field: value} for the fields of `cls` whose flags the user gave."""
    given = {}
    for f in dataclasses.fields(cls):
        dest = _dest(f.name, prefix)
        if hasattr(args, dest):
            value = getattr(args, dest)
            given[f.name] = tuple(value) if isinstance(value, list) else value
    return given


def from_args(cls, args, prefix: str = "", **overrides):
    """An instance of `cls` from the flags given (defaults for the rest) and `overrides`."""
    return cls(**{**given_fields(cls, args, prefix), **overrides})


def from_mapping(cls, mapping: dict, where: str, *, allowed_extra=()):
    """An instance of `cls` from a mapping (YAML): unknown keys are an error naming the known
    ones, values are coerced to the field types."""
    if not isinstance(mapping, dict):
        raise OptionsError(f"{where}: expected a mapping of {cls.__name__} keys, got "
                           f"{type(mapping).__name__}")
    types_ = field_types(cls)
    unknown = sorted(set(mapping) - set(types_) - set(allowed_extra))
    if unknown:
        raise OptionsError(f"{where}: unknown key(s) {unknown}; known: {sorted(types_)}")
    values = {k: coerce(v, types_[k], f"{where}: {k}") for k, v in mapping.items()
              if k in types_}
    try:
        return cls(**values)
    except TypeError as e:
        raise OptionsError(f"{where}: {e}") from None


def load_preset_config(cls, presets: dict[str, dict], preset: str, yaml_path=None,
                       overrides: dict | None = None, *, example: str = "a recipe file",
                       error: type[Exception] = OptionsError):
    """A recipe's config: the preset's values, then the YAML file's, then `overrides` (the flags
    given). A YAML file is a mapping of the dataclass's field names (plus an optional `preset`),
    read with yaml.safe_load; an unknown key is an error (of class `error`) naming the known
    ones."""
    from pathlib import Path

    if preset not in presets:
        raise error(f"unknown preset {preset!r}; known: {sorted(presets)}")
    types = field_types(cls)
    values = {}
    if yaml_path is not None:
        import yaml

        path = Path(yaml_path)
        if not path.is_file():
            raise error(f"--config {path}: no such file; give the path of a YAML recipe "
                               f"file (e.g. {example})")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise error(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix the "
                               "file") from None
        if not isinstance(loaded, dict):
            raise error(f"{path}: a recipe file is a mapping of config keys")
        unknown = sorted(set(loaded) - set(types) - {"preset"})
        if unknown:
            raise error(f"{path}: unknown key(s) {unknown}; known: {sorted(types)}")
        preset = loaded.pop("preset", preset)
        if preset not in presets:
            raise error(f"{path}: unknown preset {preset!r}; known: {sorted(presets)}")
        values = {k: coerce(v, types[k], f"{path}: {k}") for k, v in loaded.items()}
    return cls(**{**presets[preset], **values, **(overrides or {})})
