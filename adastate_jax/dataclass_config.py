"""Building frozen config dataclasses from ConfigDict sections, with errors that name the section.

Owns one fact: how a `config.<section>` mapping becomes a static dataclass (unknown fields are an
error naming them; sequence fields become tuples so the result stays hashable).
Must not know: any particular config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


def dataclass_from_dict(cls, d: Mapping, section: str, tuple_fields: Mapping[str, type] | None = None):
    """`cls(**d)` after checking field names; `tuple_fields` maps field -> element type to coerce."""
    d = dict(d)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown config.{section} fields {unknown}; known: {sorted(fields)}")
    for name, elem in (tuple_fields or {}).items():
        if name in d:
            d[name] = tuple(elem(x) for x in d[name])
    return cls(**d)
