"""A dataclass to and from what holds its fields under their names (a row's columns,
another dataclass): one mapping, driven by the dataclass's field list. Pure Python."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

D = TypeVar("D", bound="DataclassInstance")


def from_attributes(cls: type[D], source: object, *, skip: Collection[str] = (), **given: Any) -> D:
    """A `cls` whose fields are the attributes of `source` of the same names, but those
    in `skip` (left to their defaults) and those `given` (a value stored in another form)."""
    values = {
        f.name: getattr(source, f.name)
        for f in dataclasses.fields(cls)
        if f.init and f.name not in skip and f.name not in given
    }
    return cls(**values, **given)


def field_values(
    instance: DataclassInstance, *, skip: Collection[str] = (), **given: Any
) -> dict[str, Any]:
    """The fields of `instance` by name, but those in `skip`, with those `given` (a value
    stored in another form, or a column of its own) added or put in their place."""
    values = {
        f.name: getattr(instance, f.name)
        for f in dataclasses.fields(instance)
        if f.name not in skip and f.name not in given
    }
    return {**values, **given}
