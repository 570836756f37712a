"""The worker's health, for container health checks and Kubernetes probes.

The worker serves no port: while it runs, its event loop rewrites a small JSON file
(`RAVEN_WORKER_HEALTH_FILE`) every few seconds with the time and whether its NATS
connection is up. `python -m trainer_worker.health PATH` exits 0 when the file is fresh
(the loop is alive: a liveness probe), and with `--ready` only when NATS is connected too
(a readiness probe: a NATS outage must not restart a worker, which reconnects by itself
and would lose its running jobs). Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# How often the worker rewrites the file, and the age at which a probe calls it stale.
INTERVAL_S = 5.0
STALE_S = 60.0


def write(path: Path, *, connected: bool, now: float | None = None) -> None:
    """Replaces the file at once (a probe never reads half of it)."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps({"time": now or time.time(), "nats_connected": connected}))
    os.replace(staging, path)


async def keep_writing(
    path: Path,
    connected: Callable[[], bool],
    stop: asyncio.Event,
    interval_s: float = INTERVAL_S,
) -> None:
    """Until `stop` is set (or cancelled); then the file goes: a stopping worker is unhealthy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        while not stop.is_set():
            await asyncio.to_thread(write, path, connected=connected())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
    finally:
        # Synchronous: it must happen even while the task is being cancelled.
        path.unlink(missing_ok=True)  # noqa: ASYNC240


def check(path: Path, *, ready: bool, max_age_s: float, now: float | None = None) -> str | None:
    """None when healthy, else why not."""
    try:
        state = json.loads(path.read_text())
        age = (now or time.time()) - float(state["time"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"no health file at {path}: {type(error).__name__}"
    if age > max_age_s:
        return f"the worker last reported {age:.0f}s ago (more than {max_age_s:.0f}s)"
    if ready and not state.get("nats_connected"):
        return "the worker is not connected to NATS"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer_worker.health",
        description="Exit 0 when the trainer worker's health file (RAVEN_WORKER_HEALTH_FILE) is fresh.",
    )
    parser.add_argument("path", type=Path, help="the worker's RAVEN_WORKER_HEALTH_FILE")
    parser.add_argument("--ready", action="store_true", help="also require a NATS connection")
    parser.add_argument("--max-age", type=float, default=STALE_S, help="seconds (default 60)")
    args = parser.parse_args(argv)
    problem = check(args.path, ready=args.ready, max_age_s=args.max_age)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
