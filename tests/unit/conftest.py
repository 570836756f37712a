"""Unit tests do no I/O: a unit-only run fails when anything it imported loaded a
transport or database library."""

from __future__ import annotations

import pytest

from tests.suites import fail_if_loaded

# The libraries of the stack; tests/integration has them.
STACK_LIBRARIES = ("grpc", "nats", "sqlalchemy", "asyncpg")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    fail_if_loaded(session, "unit", STACK_LIBRARIES)
