"""How proto JSON writes values (json_format.MessageToDict with proto field names), for
typed values stored in that shape (shared.payloads). Pure Python."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, Self, TypeVar

Json = dict[str, Any]


class Payload(Protocol):
    """A value stored as the proto JSON of its message."""

    def to_json(self) -> Json: ...

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self: ...


P = TypeVar("P", bound=Payload)


def to_json_or_none(value: Payload | None) -> Json | None:
    return value.to_json() if value is not None else None


def from_json_or_none(cls: type[P], data: Mapping[str, Any] | None) -> P | None:
    return cls.from_json(data) if data is not None else None


def drop_defaults(data: Json) -> Json:
    """What proto JSON leaves out: unset messages, and scalars, lists and maps at their
    default."""
    return {k: v for k, v in data.items() if v not in (None, "", 0, False, [], {})}


def int64(value: int) -> str | None:
    """proto JSON writes an int64 as a string; None (left out) for 0."""
    return str(value) if value else None


def floats(data: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in data.items()}


def double(value: float) -> float | str:
    """proto JSON writes a double that is not finite as "NaN", "Infinity" or "-Infinity"
    (which a JSON column could not hold as a number)."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def doubles(data: Mapping[str, float]) -> dict[str, float | str]:
    return {k: double(v) for k, v in data.items()}


def duration(seconds: float) -> str:
    """A Duration's proto JSON: "3s", "1.500s", "0.000001s" (3, 6 or 9 decimals)."""
    nanos_total = round(seconds * 1e9)
    whole, nanos = divmod(abs(nanos_total), 1_000_000_000)
    sign = "-" if nanos_total < 0 else ""
    if nanos == 0:
        return f"{sign}{whole}s"
    if nanos % 1_000_000 == 0:
        return f"{sign}{whole}.{nanos // 1_000_000:03d}s"
    if nanos % 1000 == 0:
        return f"{sign}{whole}.{nanos // 1000:06d}s"
    return f"{sign}{whole}.{nanos:09d}s"


def seconds(duration: str | float) -> float:
    if isinstance(duration, str):
        return float(duration.removesuffix("s"))
    return float(duration)
