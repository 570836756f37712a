"""What a suite must not load: checked at the end of a run of that suite alone."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def fail_if_loaded(session: pytest.Session, suite: str, libraries: Sequence[str]) -> None:
    """Fails the run when it ran only tests of `suite` and one of `libraries` got imported."""
    folder = TESTS / suite
    if not session.items or not all(
        Path(item.path).is_relative_to(folder) for item in session.items
    ):
        return
    loaded = sorted(name for name in libraries if name in sys.modules)
    if loaded:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"tests/{suite} imported {', '.join(loaded)}: it must stay free of them"
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
