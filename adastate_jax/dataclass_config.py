"""Building frozen config dataclasses from ConfigDict sections, with errors that name the field.

Owns one fact: how a `config.<section>` mapping becomes a static (frozen, hashable) dataclass:
  * every key must be a field of the dataclass; an unknown key is an error naming it as
    `config.<section>.<key>` and suggesting the closest field;
  * absent keys take the dataclass default;
  * each value is checked against the field's annotation (int, float, bool, str, tuples, optional
    values, nested dataclasses) and converted where that is lossless (a list becomes a tuple, an
    integral float an int, an int a float), else an error naming the field and the type;
  * a `ValueError` raised by the dataclass's own validation (`__post_init__`) is re-raised with
    the section named when its message does not already name a `config.` field.
It also turns a dataclass back into a plain dict (`to_dict`), so config files can be generated from
the defaults declared here once.

Must not know: any particular config.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping

_NONE_TYPE = type(None)


def closest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def unknown_field_error(section: str, name: str, known) -> ValueError:
    return ValueError(
        f"config.{section}.{name}: unknown field{closest(name, known)}; config.{section} has {sorted(known)}"
    )


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _bad(where: str, want: str, value) -> ValueError:
    return ValueError(f"config.{where}: expected {want}, got {value!r} ({type(value).__name__})")


def coerce(value, tp, where: str):
    """`value` as the annotation `tp` (see the module docstring); raises naming `config.<where>`."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and _NONE_TYPE in args:
            return None
        options = [a for a in args if a is not _NONE_TYPE]
        if len(options) == 1:  # Optional[X]: X's own error names the field
            return coerce(value, options[0], where)
        for a in options:
            try:
                return coerce(value, a, where)
            except ValueError:
                continue
        raise _bad(where, " or ".join(getattr(a, "__name__", str(a)) for a in args), value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping) and not hasattr(value, "items"):
            raise _bad(where, f"a section of {tp.__name__} fields", value)
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, (bool,)) and type(value).__name__ != "bool_":
            raise _bad(where, "a bool", value)
        return bool(value)
    if tp is int:
        if isinstance(value, bool):
            raise _bad(where, "an int", value)
        try:
            if float(value) != int(value):
                raise ValueError
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise _bad(where, "an int", value) from None
    if tp is float:
        if isinstance(value, bool) or isinstance(value, str):
            raise _bad(where, "a number", value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise _bad(where, "a number", value) from None
    if tp is str:
        if not isinstance(value, str):
            raise _bad(where, "a string", value)
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise _bad(where, "a tuple", value)
        items = tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(items))
        if args and len(items) != len(args):
            raise _bad(where, f"a tuple of {len(args)} values", value)
        if not args:
            return items
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping) and not hasattr(value, "items"):
            raise _bad(where, "a mapping", value)
        return types.MappingProxyType(dict(_plain(value)))
    return value


def _plain(value):
    """ConfigDicts / mappings -> dicts, lists -> tuples (recursively)."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def build(cls, given: Mapping, section: str):
    """`cls(**given)` with the checks of the module docstring; `section` names it in errors."""
    given = dict(given.items()) if hasattr(given, "items") else dict(given)
    hints = _hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    for name in given:
        if name not in names:
            raise unknown_field_error(section, name, names)
    kwargs = {name: coerce(value, hints[name], f"{section}.{name}") for name, value in given.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("config."):
            raise
        raise ValueError(f"config.{section}: {msg}") from None


def dataclass_from_dict(cls, d: Mapping, section: str, tuple_fields: Mapping[str, type] | None = None):
    """`build(cls, d, section)` (`tuple_fields` is accepted for callers of the older signature;
    tuples are now coerced from the annotations)."""
    del tuple_fields
    return build(cls, d, section)


def to_dict(obj) -> dict:
    """A dataclass as nested plain dicts (mappings become dicts, tuples stay tuples)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, Mapping):
            v = {k: (to_dict(x) if dataclasses.is_dataclass(x) else x) for k, x in v.items()}
        out[f.name] = v
    return out
