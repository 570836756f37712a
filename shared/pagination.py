"""Opaque, signed page tokens for keyset pagination.

A token carries the sort key of the last row served and a fingerprint of the
query it belongs to, so page N costs what page 1 costs and a token cannot be
replayed against another query. It is signed with HMAC-SHA256 under the server's
page-token key (`RAVEN_PAGE_TOKEN_KEYS`: the first key signs, every key verifies,
so keys can be rotated): an edited or foreign token is refused before any of it is
read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf.message import Message

from shared.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A page stops growing past this many bytes of items: under the 4 MiB a gRPC client
# receives by default (the server may send 16 MiB).
MAX_PAGE_BYTES = 3 * 1024 * 1024

# Without configured keys, one per process: its tokens do not outlive it.
_keys: tuple[bytes, ...] = (secrets.token_bytes(32),)

_INVALID = "page_token is invalid: send a next_page_token of the same query unchanged"


@dataclass(frozen=True, slots=True)
class Cursor:
    """Sort key of the last row served: (value, id)."""

    value: Any
    id: str


def use_keys(keys: Iterable[str]) -> None:
    """Signs new tokens with the first of `keys` and accepts tokens of any of them;
    no keys keeps the process's own random key."""
    global _keys
    chosen = tuple(k.strip().encode() for k in keys if k.strip())
    if chosen:
        _keys = chosen


def page_size(requested: int, field: str = "page_size") -> int:
    if requested < 0:
        raise InvalidArgument([FieldViolation(field, "must not be negative")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def query_fingerprint(query: dict[str, Any]) -> str:
    canonical = json.dumps(query, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


T = TypeVar("T")


def page(
    rows: Sequence[T],
    size: int,
    cursor: Callable[[T], Cursor],
    fingerprint: str,
    *,
    weight: Callable[[T], int] | None = None,
    max_bytes: int | None = None,
) -> tuple[Sequence[T], str]:
    """Cuts `size + 1` fetched rows to a page; the extra row only says another page exists.

    With `weight` (the encoded size of a row) the page also ends before its rows pass
    `max_bytes` (MAX_PAGE_BYTES), with a token for the rest; it always has at least one row."""
    if weight is not None:
        budget = MAX_PAGE_BYTES if max_bytes is None else max_bytes
        total = 0
        for index, row in enumerate(rows[:size]):
            total += weight(row)
            if total > budget and index > 0:
                kept = rows[:index]
                return kept, encode(cursor(kept[-1]), fingerprint)
    if len(rows) <= size:
        return rows, ""
    rows = rows[:size]
    return rows, encode(cursor(rows[-1]), fingerprint)


M = TypeVar("M", bound=Message)


def rendered_page(
    rows: Sequence[T],
    size: int,
    cursor: Callable[[T], Cursor],
    fingerprint: str,
    render: Callable[[T], M],
) -> tuple[list[M], str]:
    """`page` of `size + 1` fetched rows, each rendered to the message sent for it; the
    page ends before the messages pass MAX_PAGE_BYTES."""
    kept, token = page(
        [(row, render(row)) for row in rows[:size]] + [(row, None) for row in rows[size:]],
        size,
        lambda pair: cursor(pair[0]),
        fingerprint,
        weight=lambda pair: pair[1].ByteSize() if pair[1] is not None else 0,
    )
    return [message for _, message in kept if message is not None], token


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()


def encode(cursor: Cursor, fingerprint: str) -> str:
    value = cursor.value.isoformat() if isinstance(cursor.value, datetime) else cursor.value
    payload = json.dumps(
        {"v": value, "id": cursor.id, "q": fingerprint}, separators=(",", ":")
    ).encode()
    return f"{_b64(payload)}.{_b64(_sign(_keys[0], payload))}"


def _verified(token: str) -> bytes | None:
    encoded, dot, signature = token.partition(".")
    if not dot:
        return None
    try:
        payload, mac = _unb64(encoded), _unb64(signature)
    except (ValueError, binascii.Error):
        return None
    if any(hmac.compare_digest(_sign(key, payload), mac) for key in _keys):
        return payload
    return None


def decode(token: str, fingerprint: str, *, time_value: bool = True) -> Cursor | None:
    if not token:
        return None
    payload = _verified(token)
    if payload is None:
        raise InvalidArgument([FieldViolation("page_token", _INVALID)])
    try:
        data = json.loads(payload)
        value = data["v"]
        if time_value and value is not None:
            value = datetime.fromisoformat(value)
        elif not isinstance(value, int | float | str | None):
            raise TypeError("cursor value")
        cursor = Cursor(value, str(data["id"]))
        matches = data["q"] == fingerprint
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidArgument([FieldViolation("page_token", _INVALID)]) from error
    if not matches:
        raise InvalidArgument(
            [FieldViolation("page_token", "belongs to a request with other filters or order")]
        )
    return cursor
