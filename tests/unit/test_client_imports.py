"""The Python client (client/, raven_client) stays light: importing it, its generated
stubs included, loads none of the services' or the worker's heavy libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("sqlalchemy", "asyncpg", "boto3", "botocore", "nats", "torch", "structlog", "pydantic")
# Nor the backbone's own packages: the client stands alone.
OURS = ("shared", "services", "trainer_worker", "cli")

_PROBE = """
import json, sys
import raven_client, raven_client.pb
from raven_client import RavenClient, Tls
print(json.dumps({"file": raven_client.__file__, "modules": sorted(sys.modules)}))
"""


def test_importing_the_client_loads_nothing_heavy(tmp_path: Path) -> None:
    # This checkout's client sources, from a folder where no other package is importable.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "client")}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = json.loads(done.stdout)
    assert Path(found["file"]).is_relative_to(ROOT / "client" / "raven_client")
    tops = {name.split(".")[0] for name in found["modules"]}
    assert "grpc" in tops and "raven_client" in tops, "the probe imported the client"
    assert not tops & {*HEAVY, *OURS}, sorted(tops & {*HEAVY, *OURS})
