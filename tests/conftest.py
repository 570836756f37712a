"""For the whole suite: `gpu` markers, and the stack's fixtures (tests/stack.py) for
every run that collects more than tests/unit, which must import no grpc, nats or
SQLAlchemy (tests/unit/conftest.py checks it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_worker.devices import visible_gpus

UNIT = Path(__file__).resolve().parent / "unit"
# Every process the tests start serves /metrics on a free port, not on its fixed default:
# test sessions side by side never collide.
os.environ.setdefault("RAVEN_METRICS_ADDR", "127.0.0.1:0")


def pytest_configure(config: pytest.Config) -> None:
    if not unit_only(config):
        config.pluginmanager.import_plugin("tests.stack")


def unit_only(config: pytest.Config) -> bool:
    """Whether every path this run collects lies in tests/unit."""
    here = config.invocation_params.dir
    paths = [(here / arg.split("::", 1)[0]).resolve() for arg in config.args]
    return bool(paths) and all(path.is_relative_to(UNIT) for path in paths)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips `gpu` tests where CUDA has fewer devices than they need (`gpu(2)`: two)."""
    needs = {item: _gpus_needed(item) for item in items if item.get_closest_marker("gpu")}
    if not needs:
        return
    found = _cuda_devices()
    for item, count in needs.items():
        if found < count:
            reason = f"needs {count} CUDA device{'s' if count > 1 else ''}, found {found}"
            item.add_marker(pytest.mark.skip(reason=reason))


def _gpus_needed(item: pytest.Item) -> int:
    marker = item.get_closest_marker("gpu")
    return int(marker.args[0]) if marker and marker.args else 1


def _cuda_devices() -> int:
    """CUDA devices torch sees, asked in a child so that this process stays torch-free;
    without nvidia-smi's GPUs there is no need to ask."""
    if not visible_gpus(os.environ):
        return 0
    try:
        counted = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return int(counted.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0
