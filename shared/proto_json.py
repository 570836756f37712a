"""Protobuf messages stored as JSON (proto field names), and timestamps."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

M = TypeVar("M", bound=Message)


def to_dict(message: Message) -> dict[str, Any]:
    """Proto JSON with field names as in the .proto: the shape payloads are stored in."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def parse(data: Mapping[str, Any] | None, message: M) -> M:
    if data:
        json_format.ParseDict(dict(data), message, ignore_unknown_fields=True)
    return message


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def optional_time(message: Message, field: str) -> datetime | None:
    """A Timestamp field as an aware datetime; None when the field is unset."""
    if not message.HasField(field):
        return None
    value: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return value
