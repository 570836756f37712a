from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from shared import pagination
from shared.errors import InvalidArgument


def test_a_token_round_trips_for_its_own_query():
    cursor = pagination.Cursor(datetime(2026, 5, 1, 12, tzinfo=UTC), "id-1")
    token = pagination.encode(cursor, "q1")
    assert pagination.decode(token, "q1") == cursor


def test_a_token_from_another_query_or_forged_is_refused():
    token = pagination.encode(pagination.Cursor(datetime(2026, 5, 1, tzinfo=UTC), "x"), "q1")
    with pytest.raises(InvalidArgument, match="page_token"):
        pagination.decode(token, "q2")
    with pytest.raises(InvalidArgument, match="page_token"):
        pagination.decode("not-a-token", "q1")


def test_page_size_is_bounded():
    assert pagination.page_size(0) == pagination.DEFAULT_PAGE_SIZE
    assert pagination.page_size(10_000) == pagination.MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument):
        pagination.page_size(-1)


@pytest.fixture
def keys():
    """Restores the process's page-token keys after a test that changes them."""
    saved = pagination._keys
    yield pagination.use_keys
    pagination._keys = saved


def test_an_edited_token_is_refused_before_it_is_read():
    token = pagination.encode(pagination.Cursor(datetime(2026, 5, 1, tzinfo=UTC), "x"), "q1")
    payload, _, signature = token.partition(".")
    forged = base64.urlsafe_b64encode(b'{"v":"not a time","id":"1 OR 1=1","q":"q1"}').decode()
    for edited in (f"{forged}.{signature}", f"{payload}.{signature[:-2]}AA", payload, "a.b.c"):
        with pytest.raises(InvalidArgument) as caught:
            pagination.decode(edited, "q1")
        assert caught.value.violations[0].field == "page_token"
        assert "page_token is invalid" in caught.value.violations[0].description


def test_keys_rotate_the_first_signs_and_every_one_verifies(keys):
    keys(["old-key-0123456789"])
    old = pagination.encode(pagination.Cursor(7, "7"), "q")
    keys(["new-key-0123456789", "old-key-0123456789"])
    assert pagination.decode(old, "q", time_value=False) == pagination.Cursor(7, "7")
    new = pagination.encode(pagination.Cursor(8, "8"), "q")
    keys(["new-key-0123456789"])
    assert pagination.decode(new, "q", time_value=False) == pagination.Cursor(8, "8")
    with pytest.raises(InvalidArgument, match="page_token"):
        pagination.decode(old, "q", time_value=False)


def test_a_page_ends_before_its_items_pass_the_byte_budget():
    def page_of_ten(item_bytes: int) -> tuple[Sequence[int], str]:
        return pagination.page(
            list(range(10)),
            9,
            lambda row: pagination.Cursor(row, str(row)),
            "q",
            weight=lambda row: item_bytes,
            max_bytes=1000,
        )

    kept, token = page_of_ten(400)
    assert kept == [0, 1]
    assert pagination.decode(token, "q", time_value=False) == pagination.Cursor(1, "1")
    # One item over the budget still makes a page: the caller moves on.
    kept, token = page_of_ten(5000)
    assert kept == [0] and token


def test_page_token_keys_come_comma_separated_and_long_enough(monkeypatch):
    from pydantic import ValidationError

    from shared.settings import Settings

    monkeypatch.setenv("RAVEN_PAGE_TOKEN_KEYS", "new-key-0123456789, old-key-0123456789")
    assert Settings().page_token_key_list() == ["new-key-0123456789", "old-key-0123456789"]
    monkeypatch.setenv("RAVEN_PAGE_TOKEN_KEYS", "short")
    with pytest.raises(ValidationError, match="at least 16"):
        Settings()
