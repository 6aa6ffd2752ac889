"""Typed config dataclasses with strict keys, loaded from TOML.

Every component owns a dataclass; every field carries a one-line docstring in the
comment beside it. An unknown key is an error that names the key and where it was
found, so a typo in a recipe fails at once instead of silently using a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or option that cannot be used; the message names the key and the file."""


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {hint}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types."""
    if isinstance(data, cls):
        return data
    if hasattr(cls, "from_table"):  # a section whose keys are not fixed fields ([filter.NAME] tables)
        return cls.from_table(data, where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(fields))})"
        )
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    defaults = {f.name: field_default(f) for f in dataclasses.fields(cls)}
    for k, v in kwargs.items():
        _check_sign(v, defaults[k], f"{where}.{k}")
    return cls(**kwargs)


def _check_sign(value: Any, default: Any, where: str) -> None:
    """Counts, sizes, thresholds and rates whose default is not negative cannot be set
    negative: `timeout_s = -1.0` would otherwise drop every page as a timeout."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if number(value) and number(default) and default >= 0 and value < 0:
        raise ConfigError(f"{where}: must not be negative, got {value!r}")


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def read_json(path: str | Path, what: str) -> dict:
    """A small JSON object file (an index, a summary), or a ConfigError naming the path."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: {what} not found") from e
    except ValueError as e:
        raise ConfigError(f"{path}: {what} is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} is not a JSON object")
    return data


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: recipe file does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from e


# ---------------------------------------------------------------------------
# Command-line options derived from config dataclasses

def field_help(cls: type) -> dict[str, str]:
    """Each field's one-line comment (`name: type = default  # comment`), read from the
    class's source: the one place a setting is explained, for recipes and --help alike."""
    import inspect
    import re

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out = {}
    for line in lines:
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out.setdefault(m.group(1), m.group(2).strip())
    return out


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _scalar(hint: Any) -> Any:
    """The scalar type behind `X | None`, or None when the hint is not one."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 and args[0] in (int, float, str, bool) else None
    return hint if hint in (int, float, str, bool) else None


def add_config_options(parser, cls: type, section: str) -> list[str]:
    """One option per field of dataclass `cls`: `--field-name`, typed from the annotation,
    its help the field's comment plus the dataclass default. Every option defaults to
    None (not given), so only what the user typed overrides the recipe; `config_overrides`
    collects them. Fields of other shapes (nested tables) are left to `--set`.
    Returns the fields given options."""
    import argparse

    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    added = []
    for f in dataclasses.fields(cls):
        hint, flag = hints[f.name], "--" + f.name.replace("_", "-")
        default = field_default(f)
        text = helps.get(f.name, "")
        text = f"{text} (default: {default!r})" if text else f"default: {default!r}"
        text = text.replace("%", "%%")
        dest, metavar = f"{section}.{f.name}", f.name.upper()
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if _scalar(hint) is bool:
            parser.add_argument(flag, dest=dest, default=None, action=argparse.BooleanOptionalAction, help=text)
        elif _scalar(hint) is not None:
            parser.add_argument(flag, dest=dest, default=None, type=_scalar(hint), metavar=metavar, help=text)
        elif origin is list and args and _scalar(args[0]):
            parser.add_argument(flag, dest=dest, default=None, nargs="+", type=args[0], metavar=metavar,
                                help=text)
        elif origin is dict and len(args) == 2 and _scalar(args[1]):
            parser.add_argument(flag, dest=dest, default=None, nargs="+", metavar="KEY=VALUE",
                                type=_key_value(args[1], flag), help=text)
        else:
            continue
        added.append(f.name)
    return added


def _key_value(value_type: type, flag: str):
    def parse(item: str) -> tuple[str, Any]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            return key, value_type(value)
        except ValueError:
            raise ConfigError(f"{flag} {item!r}: {value!r} is not a {value_type.__name__}") from None
    return parse


def config_overrides(args: Any) -> dict:
    """The options `add_config_options` added that the user gave, as {section: {key: value}}."""
    out: dict = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, key = dest.split(".", 1)
            if isinstance(value, list) and value and isinstance(value[0], tuple):
                value = dict(value)
            out.setdefault(section, {})[key] = value
    return out


def parse_set(items: list[str]) -> dict:
    """`--set section.key=value` (repeatable; `filter.gopher_quality.min_doc_words=50` nests)
    as a recipe table. The value is read as TOML (`0.5`, `true`, `["en", "de"]`), else
    taken as a string, so `--set tokenize.tokenizer=models/tok` needs no quotes."""
    out: dict = {}
    for item in items or []:
        path, sep, text = item.partition("=")
        keys = path.strip().split(".")
        if not sep or len(keys) < 2 or not all(keys):
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. langid.min_score=0.5")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        table = out
        for key in keys[:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {key} is set to a value and to a table")
        table[keys[-1]] = value
    return out


def apply_scale(data: dict, scale: str | None, where: str) -> dict:
    """A recipe at a named scale: the file as written is its "paper" scale, and each
    `[scale.<name>]` table overlays it for a smaller run (a tiny preset, the demo's data,
    budgets divided). Tables merge key by key (`merge`); `[[stage]]` arrays are matched
    by name, `[scale.tiny.stage.core]` overlaying the stage named "core". The result has
    no `scale` key, so each part parses it as any recipe of its own.

        [scale.tiny.model]
        preset = "llama3-tiny"
        [scale.tiny.stage.core]
        tokens = 200_000

    `scale` None or "paper" leaves the recipe as written; any other name must be one of
    the recipe's scales."""
    out = dict(data)
    scales = out.pop("scale", {})
    if not isinstance(scales, dict) or not all(isinstance(v, dict) for v in scales.values()):
        raise ConfigError(f"{where}: [scale] holds one table per scale name ([scale.tiny] ...)")
    if scale in (None, "", "paper"):
        return out
    if scale not in scales:
        known = ", ".join(["paper", *scales]) if scales else "paper (the recipe has no [scale.*] tables)"
        raise ConfigError(f"{where}: --scale {scale}: not a scale of this recipe (known: {known})")
    overlay = dict(scales[scale])
    stages = overlay.pop("stage", {})
    out = merge(out, overlay)
    if stages:
        if not isinstance(stages, dict) or not isinstance(out.get("stage"), list):
            raise ConfigError(f"{where}: [scale.{scale}.stage.<name>] tables overlay the recipe's [[stage]] by name")
        names = [s.get("name") for s in out["stage"]]
        unknown = sorted(set(stages) - set(names))
        if unknown:
            raise ConfigError(f"{where}: [scale.{scale}.stage.{unknown[0]}]: no [[stage]] of that name "
                              f"(stages: {', '.join(map(str, names))})")
        out["stage"] = [merge(s, stages.get(s.get("name"), {})) for s in out["stage"]]
    return out


def merge(base: dict, override: dict) -> dict:
    """`override`'s keys over `base`'s, tables merged key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
