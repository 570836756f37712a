from __future__ import annotations

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
