"""The `raven` CLI run as a user runs it, against the test stack's servers over mTLS."""

from __future__ import annotations

import asyncio

from click.testing import Result
from typer.testing import CliRunner

from cli.main import app
from services.trained_models.main import TrainedModelsApp
from services.training_runs.main import TrainingRunsApp
from tests import pki as test_pki


async def raven(
    pki: test_pki.Pki,
    training_runs: TrainingRunsApp,
    trained_models: TrainedModelsApp,
    *args: str,
    identity: str = test_pki.ADMIN,
) -> Result:
    """Runs `raven ARGS...` with the client certificate of `identity`; in a thread, since
    the servers it calls serve on this event loop."""
    cert, key = pki.client_files(identity)
    env = {
        "RAVEN_TRAINING_RUNS_ADDR": f"127.0.0.1:{training_runs.port}",
        "RAVEN_TRAINED_MODELS_ADDR": f"127.0.0.1:{trained_models.port}",
        "RAVEN_TLS_CERT_FILE": str(cert),
        "RAVEN_TLS_KEY_FILE": str(key),
        "RAVEN_TLS_CA_FILE": str(pki.ca_file),
        "COLUMNS": "200",
    }
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)
