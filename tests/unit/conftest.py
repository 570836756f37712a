"""Unit tests do no I/O: a unit-only run fails when anything it imported loaded a
transport or database library."""

from __future__ import annotations

import pytest

from tests.suites import fail_if_loaded

# The libraries of the stack; tests/integration has them. nats is not listed yet: the
# worker's job pipeline (trainer_worker.pipeline, .cancellation) imports its publisher.
STACK_LIBRARIES = ("grpc", "sqlalchemy", "asyncpg")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    fail_if_loaded(session, "unit", STACK_LIBRARIES)
