"""Every test here runs real MMDetection training (or the whole benchmark harness)
through the system: all carry the `e2e` marker, so `-m "not e2e"` leaves them out."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(item.path).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)
