"""Every TLS failure the CLI can tell apart is one line, with no traceback and no gRPC core
log, against the real test servers; a read command creates no certificates anywhere."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import sys
import threading
from pathlib import Path

import pytest
from raven_client import Problem, Tls, diagnose, probe

from services.trained_models.main import TrainedModelsApp
from services.training_runs.main import TrainingRunsApp
from shared.auth import certs
from tests import pki as test_pki
from tests.cli import REPO, Result, raven

pytestmark = pytest.mark.timeout(120)

# This checkout's client package, ahead of any installed copy; gRPC core's verbosity as
# a user has it who never set it (the CLI silences it).
CLIENT_PATH = {
    "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "client")]),
    "GRPC_VERBOSITY": "",
}


def _error_line(result: Result) -> str:
    """The one line the CLI printed, checked to be the only one and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error "), result.output
    return lines[0]


def _client_files(
    folder: Path,
    ca: tuple[certs.x509.Certificate, certs.Key],
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> dict[str, str]:
    """RAVEN_TLS_CERT_FILE and RAVEN_TLS_KEY_FILE of an admin certificate signed by `ca`."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = certs.issue(*ca, uris=[test_pki.ADMIN], not_before=not_before, not_after=not_after)
    certs.write_cert(folder / "client.crt", cert)
    certs.write_key(folder / "client.key", key)
    return {
        "RAVEN_TLS_CERT_FILE": str(folder / "client.crt"),
        "RAVEN_TLS_KEY_FILE": str(folder / "client.key"),
    }


def _session_ca(pki: test_pki.Pki) -> tuple[certs.x509.Certificate, certs.Key]:
    return pki.ca, pki._ca_key


def _free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return int(probe_socket.getsockname()[1])


@pytest.fixture
def cli(pki: test_pki.Pki, training_runs: TrainingRunsApp, trained_models: TrainedModelsApp):
    async def run(*args: str, env: dict[str, str] | None = None) -> Result:
        return await raven(
            pki, training_runs, trained_models, *args, env={**CLIENT_PATH, **(env or {})}
        )

    return run


async def test_an_expired_client_certificate_is_named(cli, pki, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    files = _client_files(
        tmp_path, _session_ca(pki), not_before=now - dt.timedelta(days=2),
        not_after=now - dt.timedelta(days=1),
    )  # fmt: skip
    line = _error_line(await cli("runs", "list", env=files))
    assert "RAVEN_TLS_CERT_FILE" in line and "expired on" in line


async def test_a_client_certificate_not_yet_valid_is_named(cli, pki, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    files = _client_files(
        tmp_path, _session_ca(pki), not_before=now + dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=2),
    )  # fmt: skip
    line = _error_line(await cli("runs", "list", env=files))
    assert "RAVEN_TLS_CERT_FILE" in line and "is not valid until" in line


async def test_a_client_certificate_of_another_ca_is_refused_by_the_server(
    cli, tmp_path: Path
) -> None:
    files = _client_files(tmp_path, certs.new_ca("another CA"))
    line = _error_line(await cli("runs", "list", env=files))
    assert "refused the client certificate" in line and "RAVEN_TLS_CERT_FILE" in line


async def test_a_server_certificate_of_an_unknown_ca_is_named(cli, tmp_path: Path) -> None:
    other, _ = certs.new_ca("not the servers' CA")
    certs.write_cert(tmp_path / "ca.crt", other)
    line = _error_line(
        await cli("runs", "list", env={"RAVEN_TLS_CA_FILE": str(tmp_path / "ca.crt")})
    )
    assert "is signed by a CA not in the CA file" in line
    assert "RAVEN_TLS_CA_FILE" in line


async def test_a_server_name_mismatch_is_named(cli) -> None:
    line = _error_line(await cli("runs", "list", env={"RAVEN_TLS_SERVER_NAME": "elsewhere.test"}))
    assert "is not valid for the name 'elsewhere.test'" in line
    assert "RAVEN_TLS_SERVER_NAME" in line


async def test_a_missing_key_file_is_named_by_its_setting(cli, tmp_path: Path) -> None:
    missing = tmp_path / "gone.key"
    line = _error_line(await cli("runs", "list", env={"RAVEN_TLS_KEY_FILE": str(missing)}))
    assert line == f"error RAVEN_TLS_KEY_FILE: no such file {missing}"


async def test_a_port_with_nothing_listening_is_named(cli) -> None:
    address = f"127.0.0.1:{_free_port()}"
    line = _error_line(await cli("runs", "list", env={"RAVEN_TRAINING_RUNS_ADDR": address}))
    assert f"nothing is listening at {address}" in line and "make up" in line


async def test_other_errors_keep_their_grpc_status(cli) -> None:
    result = await cli("runs", "get", "trainingRuns/00000000-0000-0000-0000-000000000000")
    assert result.exit_code == 1 and "NOT_FOUND" in result.output, result.output
    assert "Traceback" not in result.output


async def test_a_read_command_elsewhere_creates_no_certificates(
    training_runs: TrainingRunsApp, tmp_path: Path
) -> None:
    """Run from a folder that is not the checkout, for a user with no certificates yet."""
    cwd, home = tmp_path / "elsewhere", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("RAVEN_", "XDG_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "runs", "list",
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={
            **env, **CLIENT_PATH, "HOME": str(home), "COLUMNS": "400",
            "RAVEN_TRAINING_RUNS_ADDR": f"127.0.0.1:{training_runs.port}",
        },
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    line = _error_line(Result(process.returncode, stdout.decode(), stderr.decode()))
    assert f"no development certificates in {home / '.config' / 'raven' / 'certs'}" in line
    assert "`make certs`" in line and "`raven certs`" in line
    assert list(cwd.iterdir()) == [] and list(home.iterdir()) == []


# raven_client.diagnose on its own: what a backend team's client sees.


def _tls(pki: test_pki.Pki, tmp_path: Path, **validity: dt.datetime) -> Tls:
    files = _client_files(tmp_path, _session_ca(pki), **validity)
    return Tls(ca=pki.ca_file, cert=files["RAVEN_TLS_CERT_FILE"], key=files["RAVEN_TLS_KEY_FILE"])


async def test_diagnose_finds_nothing_wrong_with_a_good_client(
    pki: test_pki.Pki, training_runs: TrainingRunsApp, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{training_runs.port}"
    # The servers share this event loop: the blocking probe runs beside it.
    assert await asyncio.to_thread(diagnose, address, _tls(pki, tmp_path)) is None


async def test_diagnose_reads_the_servers_alert_about_an_expired_client_certificate(
    pki: test_pki.Pki, training_runs: TrainingRunsApp, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    tls = _tls(
        pki, tmp_path, not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(days=1)
    )
    found = await asyncio.to_thread(probe, f"127.0.0.1:{training_runs.port}", tls)
    assert found is not None and found.problem is Problem.CLIENT_CERT_REFUSED, found
    assert "refused the client certificate" in found.message


async def test_diagnose_names_a_missing_ca_file(
    pki: test_pki.Pki, training_runs: TrainingRunsApp, tmp_path: Path
) -> None:
    tls = Tls(ca=tmp_path / "none.crt", cert=pki.server_cert, key=pki.server_key)
    found = await asyncio.to_thread(probe, f"127.0.0.1:{training_runs.port}", tls)
    assert found is not None and found.problem is Problem.CLIENT_FILES
    assert found.message == f"CA file {tmp_path / 'none.crt'}: No such file or directory"


def test_diagnose_knows_a_plaintext_server(pki: test_pki.Pki, tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))

    def answer_in_plaintext() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer_in_plaintext, daemon=True)
    thread.start()
    with server:
        found = probe(f"127.0.0.1:{server.getsockname()[1]}", _tls(pki, tmp_path))
        thread.join(10)
    assert found is not None and found.problem is Problem.NOT_TLS, found
