"""A tiny typed-schema engine: JSON dicts -> frozen dataclasses, refusing anything it does not know.

Each config section is a frozen dataclass; a field's ``metadata`` may carry:
  ``doc``   one-line description (the config reference is generated from it),
  ``min`` / ``max`` / ``gt``   numeric bounds, ``choices`` allowed values,
  ``alias`` another accepted spelling of the key (e.g. DeepSpeed's ``bfloat16``).
Errors are ``ConfigError``s naming the dotted key path, with a did-you-mean where one fits.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any

from engine.errors import ConfigError

# DeepSpeed-style refusals: key -> reason. A section given as {"enabled": false} (or empty) is accepted,
# since it asks for nothing; anything else in it is refused by name.
Refusals = dict[str, str]


def field(default: Any = dataclasses.MISSING, *, doc: str, factory: Any = None, **meta: Any) -> Any:
    """A dataclass field with schema metadata; ``factory`` for mutable/nested defaults."""
    md = {"doc": doc, **meta}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def suggest(key: str, known: list[str]) -> str | None:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "object"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def convert(tp: Any, value: Any, path: str, refusals: Refusals) -> Any:
    """Convert a JSON value to ``tp`` or raise a ConfigError naming ``path``."""
    try:
        return _convert(tp, value, path, refusals)
    except ConfigError:
        if value == "auto":
            raise ConfigError(
                f'{path}: "auto" needs a value',
                hint="'auto' is filled in by the Hugging Face Trainer integration; Trident needs the number itself",
            ) from None
        raise


def _convert(tp: Any, value: Any, path: str, refusals: Refusals) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, path, refusals)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
        hint = suggest(value, list(choices)) if isinstance(value, str) else None
        raise ConfigError(
            f"{path}: {_describe(value)} is not one of {', '.join(json.dumps(c) for c in choices)}", hint=hint
        )
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        (item_tp, *_rest) = typing.get_args(tp)
        items = [convert(item_tp, v, f"{path}[{i}]", refusals) for i, v in enumerate(value)]
        return tuple(items)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected an object, got {_describe(value)}")
        return build(tp, value, path, refusals)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # DeepSpeed configs write sizes as 5e8: accept floats that are whole numbers.
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")


def _check_bounds(f: dataclasses.Field, value: Any, path: str) -> None:
    md = f.metadata
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if "min" in md and value < md["min"]:
        raise ConfigError(f"{path}: must be >= {md['min']}, got {value}")
    if "gt" in md and value <= md["gt"]:
        raise ConfigError(f"{path}: must be > {md['gt']}, got {value}")
    if "max" in md and value > md["max"]:
        raise ConfigError(f"{path}: must be <= {md['max']}, got {value}")


def _refusal_accepts(value: Any, refusal: str = "") -> bool:
    """A refused feature given only as switched off asks for nothing and is accepted: ``null``, ``false``,
    ``{}``, a section with ``"enabled": false`` (whatever else it sets), an offload with ``"device": "none"``,
    or a value the refusal lists as what Trident does anyway (``refusal.accepts``)."""
    if value is None or value is False or value in getattr(refusal, "accepts", ()):
        return True
    if isinstance(value, dict):
        if "enabled" in value:
            return value["enabled"] is False
        return not value or value.get("device", "") in ("none", None)
    return False


def build(cls: type, data: dict, path: str, refusals: Refusals) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys are refused with a did-you-mean."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {f.metadata["alias"]: f.name for f in fields.values() if "alias" in f.metadata}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = _join(path, key)
        if key_path in refusals:
            if _refusal_accepts(value, refusals[key_path]):
                continue
            raise ConfigError(f"{key_path}: {refusals[key_path]}")
        name = aliases.get(key, key)
        if name not in fields:
            known = list(fields) + list(aliases)
            raise ConfigError(
                f"{key_path}: unknown key", hint=suggest(key, known) or f"known keys here: {', '.join(sorted(fields))}"
            )
        if name in kwargs:
            raise ConfigError(f"{key_path}: given twice (as '{key}' and its alias)")
        f = fields[name]
        conv = convert(hints[name], value, key_path, refusals)
        if "choices" in f.metadata and conv not in f.metadata["choices"]:
            raise ConfigError(
                f"{key_path}: {_describe(conv)} is not one of "
                f"{', '.join(json.dumps(c) for c in f.metadata['choices'])}",
                hint=f.metadata.get("doc") or None,
            )
        _check_bounds(f, conv, key_path)
        kwargs[name] = conv
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{_join(path, missing[0])}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(path)
    return obj


def reference_rows(cls: type, path: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) rows for the generated config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = _join(path, f.name)
        if dataclasses.is_dataclass(tp):
            rows.append((key, "object", "", f.metadata.get("doc", "")))
            rows.extend(reference_rows(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = json.dumps(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            made = f.default_factory()
            default = json.dumps(dataclasses.asdict(made) if dataclasses.is_dataclass(made) else made)
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), default, f.metadata.get("doc", "")))
    return rows
