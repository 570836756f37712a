"""The `raven` CLI run as a user runs it: its own process, against the test stack's
servers over mTLS, with a client certificate of the test's choosing."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from services.trained_models.main import TrainedModelsApp
from services.training_runs.main import TrainingRunsApp
from tests import pki as test_pki

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """What a person sees in the terminal: both streams."""
        return self.stdout + self.stderr


async def raven(
    pki: test_pki.Pki,
    training_runs: TrainingRunsApp,
    trained_models: TrainedModelsApp,
    *args: str,
    identity: str = test_pki.ADMIN,
    env: dict[str, str] | None = None,
) -> Result:
    """Runs `raven ARGS...` (python -m cli.main) with the client certificate of `identity`."""
    cert, key = pki.client_files(identity)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={
            **os.environ,
            "RAVEN_TRAINING_RUNS_ADDR": f"127.0.0.1:{training_runs.port}",
            "RAVEN_TRAINED_MODELS_ADDR": f"127.0.0.1:{trained_models.port}",
            "RAVEN_TLS_CERT_FILE": str(cert),
            "RAVEN_TLS_KEY_FILE": str(key),
            "RAVEN_TLS_CA_FILE": str(pki.ca_file),
            "COLUMNS": "200",
            **(env or {}),
        },
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())
