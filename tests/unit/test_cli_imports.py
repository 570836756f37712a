"""Starting `raven` stays quick: importing the CLI loads none of the services' or the
worker's heavy libraries, and no pydantic (its settings come from cli/config.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("sqlalchemy", "asyncpg", "boto3", "botocore", "torch", "nats", "structlog", "pydantic")

_PROBE = "import json, sys; import cli.main; print(json.dumps(sorted(sys.modules)))"


def test_importing_the_cli_loads_nothing_heavy() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client")])}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    tops = {name.split(".")[0] for name in json.loads(done.stdout)}
    assert {"cli", "typer", "grpc", "raven_client"} <= tops, "the probe imported the CLI"
    # cryptography too: only commands that connect check certificate dates with it.
    assert not tops & {*HEAVY, "cryptography"}, sorted(tops & {*HEAVY, "cryptography"})
