"""What the numbers were measured on: the machine and the versions of everything."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata

import psutil

_PACKAGES = (
    "grpcio",
    "protobuf",
    "nats-py",
    "sqlalchemy",
    "asyncpg",
    "torch",
    "mmengine",
    "mmcv",
    "mmdet",
    "numpy",
)


def facts() -> dict[str, object]:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["nats-server"] = _output(["nats-server", "--version"])
    found["postgres (client)"] = _output(["psql", "--version"])
    return found


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _output(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
