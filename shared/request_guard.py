"""Every request is parsed and checked against `shared.limits` before a handler sees it.

`check_request` walks a message by its descriptor: strings (no NUL, bounded), enums
(defined numbers only: proto3 keeps unknown ones), Timestamps and Durations (in
range), doubles (finite), maps and repeated fields (bounded), nested messages.
`shared.calls` applies it to every call, and turns request bytes which do not parse
(`safe_deserializer` makes them `Unparsed`) into INVALID_ARGUMENT instead of grpc's
UNKNOWN (which names the parser's exception class and logs a traceback per call).
This module imports no transport.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from shared import limits
from shared.errors import FieldViolation

# google.protobuf.Timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)
_DURATION_SECONDS = 315_576_000_000
_NANOS_MAX = 999_999_999
# Violations reported for one request: enough to act on, never a huge status.
_MAX_VIOLATIONS = 20
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


class _Violations:
    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        if len(self.items) < _MAX_VIOLATIONS:
            self.items.append(FieldViolation(field, description))

    @property
    def full(self) -> bool:
        return len(self.items) >= _MAX_VIOLATIONS


def check_request(message: Message) -> list[FieldViolation]:
    """Every bound `message` breaks, by field path ("training_run.spec.device")."""
    found = _Violations()
    _message(message, "", found)
    return found.items


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)
    if repeated is not None:
        return bool(repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED  # type: ignore[attr-defined,no-any-return]


def _message(message: Message, prefix: str, found: _Violations) -> None:
    descriptor = message.DESCRIPTOR
    if descriptor.full_name == "google.protobuf.Timestamp":
        _timestamp(message, prefix.rstrip("."), found)
        return
    if descriptor.full_name == "google.protobuf.Duration":
        _duration(message, prefix.rstrip("."), found)
        return
    skip = limits.output_only(descriptor.full_name)
    for field, value in message.ListFields():
        if found.full:
            return
        if field.name in skip:
            continue
        path = prefix + field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            _map(descriptor.full_name, field, value, path, found)
        elif _is_repeated(field):
            most = limits.bound(
                descriptor.full_name, field.name, default=limits.DEFAULT_REPEATED_MAX
            )
            if len(value) > most:
                found.add(path, f"at most {most} entries, got {len(value)}")
                continue
            item_max = limits.item_bound(descriptor.full_name, field.name)
            for item in value:
                _value(field, item, path, found, string_max=item_max)
        else:
            string_max = limits.bound(
                descriptor.full_name, field.name, default=limits.DEFAULT_STRING_MAX
            )
            _value(field, value, path, found, string_max=string_max)


def _value(
    field: FieldDescriptor, value: Any, path: str, found: _Violations, *, string_max: int
) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        _message(value, path + ".", found)
    elif field.type == FieldDescriptor.TYPE_STRING:
        _string(value, path, found, string_max)
    elif field.type == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        enum = field.enum_type
        if enum.values_by_number.get(value) is None:
            names = ", ".join(v.name for v in enum.values if v.number != 0)
            found.add(path, f"unknown value {value}; one of: {names}")
    elif field.type in _FLOATS and not math.isfinite(value):
        found.add(path, f"must be a finite number, got {value}")


def _string(value: str, path: str, found: _Violations, most: int) -> None:
    if len(value) > most:
        found.add(path, f"at most {most} characters, got {len(value)}")
    elif "\x00" in value:
        found.add(path, "must not contain NUL characters")


def _map(owner: str, field: FieldDescriptor, value: Any, path: str, found: _Violations) -> None:
    entry = field.message_type
    assert entry is not None
    key_field = entry.fields_by_name["key"]
    value_field = entry.fields_by_name["value"]
    if (
        field.name == "labels"
        and key_field.type == FieldDescriptor.TYPE_STRING
        and value_field.type == FieldDescriptor.TYPE_STRING
    ):
        for problem in limits.label_problems(value):
            found.add(path, problem)
        return
    most = limits.bound(owner, field.name, default=limits.DEFAULT_REPEATED_MAX)
    if len(value) > most:
        found.add(path, f"at most {most} entries, got {len(value)}")
        return
    for key, item in value.items():
        if key_field.type == FieldDescriptor.TYPE_STRING:
            _string(key, path, found, limits.DEFAULT_STRING_MAX)
        _value(value_field, item, path, found, string_max=limits.DEFAULT_STRING_MAX)


def _timestamp(message: Any, path: str, found: _Violations) -> None:
    low, high = _TIMESTAMP_SECONDS
    if not low <= message.seconds <= high:
        found.add(path, "seconds must be within years 1 to 9999")
    if not 0 <= message.nanos <= _NANOS_MAX:
        found.add(path, f"nanos must be between 0 and {_NANOS_MAX}")


def _duration(message: Any, path: str, found: _Violations) -> None:
    if abs(message.seconds) > _DURATION_SECONDS:
        found.add(path, f"seconds must be between -{_DURATION_SECONDS} and {_DURATION_SECONDS}")
    if abs(message.nanos) > _NANOS_MAX or (message.seconds * message.nanos < 0):
        found.add(path, "nanos must be below a second and have the sign of seconds")


class Unparsed:
    """What a request that does not parse becomes, so the handler wrapper can refuse it."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def safe_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """`deserializer`, returning `Unparsed` for bytes that do not parse instead of raising."""
    message_type = getattr(deserializer, "__self__", None)
    type_name = (
        message_type.DESCRIPTOR.name
        if isinstance(message_type, type) and issubclass(message_type, Message)
        else "message"
    )

    def deserialize(raw: bytes) -> Any:
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception:
            return Unparsed(type_name)

    return deserialize
