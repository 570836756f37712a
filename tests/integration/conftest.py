"""Real Postgres, NATS and gRPC servers (tests/stack.py), and no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.settings import Settings
from tests.suites import fail_if_loaded

# Training lives in tests/e2e: the integration suite runs no MMDetection.
TRAINING_LIBRARIES = ("torch", "mmengine", "mmdet", "mmcv")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    fail_if_loaded(session, "integration", TRAINING_LIBRARIES)


@pytest.fixture(scope="session")
def dataset_uri(settings: Settings) -> str:
    """An annotation file that exists: the service checks existence, the worker the content
    (no worker trains in these tests)."""
    path = Path(settings.artifact_root) / "datasets" / "placeholder" / "annotations.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return "datasets/placeholder/annotations.json"
