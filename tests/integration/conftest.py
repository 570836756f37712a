from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.settings import Settings


@pytest.fixture(scope="session")
def dataset_uri(settings: Settings) -> str:
    """An annotation file that exists: the service checks existence, the worker the content
    (no worker trains in these tests)."""
    path = Path(settings.artifact_root) / "datasets" / "placeholder" / "annotations.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return "datasets/placeholder/annotations.json"
