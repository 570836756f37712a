"""The domain modules import no transport or storage library: each imports with grpc,
nats, SQLAlchemy and protobuf blocked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("grpc", "nats", "sqlalchemy", "google.protobuf")
PURE = (
    "services.training_runs.domain",
    "services.trained_models.domain",
    "shared.metrics",
    "shared.json_shape",
    "shared.payloads",
    "shared.reports",
    "trainer_worker.protocol",
)


@pytest.mark.parametrize("module", PURE)
def test_a_domain_module_imports_without_transport_or_storage(module: str) -> None:
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in BLOCKED)
    code = f"import sys\n{blocked}import {module}\n"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
