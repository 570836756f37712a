"""Opaque page tokens for keyset pagination.

A token carries the sort key of the last row served and a fingerprint of the
query it belongs to, so page N costs what page 1 costs and a token cannot be
replayed against another query.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from shared.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class Cursor:
    """Sort key of the last row served: (value, id)."""

    value: Any
    id: str


def page_size(requested: int, field: str = "page_size") -> int:
    if requested < 0:
        raise InvalidArgument([FieldViolation(field, "must not be negative")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def query_fingerprint(query: dict[str, Any]) -> str:
    canonical = json.dumps(query, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


T = TypeVar("T")


def page(
    rows: Sequence[T], size: int, cursor: Callable[[T], Cursor], fingerprint: str
) -> tuple[Sequence[T], str]:
    """Cuts `size + 1` fetched rows to a page; the extra row only says another page exists."""
    if len(rows) <= size:
        return rows, ""
    rows = rows[:size]
    return rows, encode(cursor(rows[-1]), fingerprint)


def encode(cursor: Cursor, fingerprint: str) -> str:
    value = cursor.value.isoformat() if isinstance(cursor.value, datetime) else cursor.value
    raw = json.dumps({"v": value, "id": cursor.id, "q": fingerprint}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, fingerprint: str, *, time_value: bool = True) -> Cursor | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        value = data["v"]
        if time_value and value is not None:
            value = datetime.fromisoformat(value)
        cursor = Cursor(value, str(data["id"]))
        matches = data["q"] == fingerprint
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidArgument(
            [FieldViolation("page_token", "not a token this server issued")]
        ) from error
    if not matches:
        raise InvalidArgument(
            [FieldViolation("page_token", "belongs to a request with other filters or order")]
        )
    return cursor
