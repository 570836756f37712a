"""RPC errors reach the user as a status code, a message and field violations: no traceback;
the commands offer their options."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from typer.testing import CliRunner

from cli.main import app
from shared.auth.certs import ensure_dev_certs
from shared.proto.raven.training.v1 import training_run_pb2, training_run_pb2_grpc

pytestmark = pytest.mark.timeout(30)


class _RefusingRuns(training_run_pb2_grpc.TrainingRunServiceServicer):
    """Answers every GetTrainingRun the way the real service answers a malformed name."""

    def GetTrainingRun(
        self, request: training_run_pb2.GetTrainingRunRequest, context: grpc.ServicerContext
    ) -> training_run_pb2.TrainingRun:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field="name", description=f"expected trainingRuns/{{uuid}}, got {request.name!r}"
        )
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        context.abort_with_status(
            rpc_status.to_status(
                status_pb2.Status(
                    code=code_pb2.INVALID_ARGUMENT, message="invalid request", details=[detail]
                )
            )
        )
        raise AssertionError("abort_with_status returns only by raising")


@pytest.fixture
def refusing_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    training_run_pb2_grpc.add_TrainingRunServiceServicer_to_server(_RefusingRuns(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_nothing_listening_is_a_clean_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAVEN_TRAINING_RUNS_ADDR", "127.0.0.1:1")
    monkeypatch.setenv(
        "RAVEN_DEV_CERTS_DIR", str(ensure_dev_certs(tmp_path / "certs")[0].directory)
    )
    result = CliRunner().invoke(app, ["runs", "get", "abc"])
    assert result.exit_code == 1
    assert "nothing is listening at 127.0.0.1:1" in result.output
    assert "make up" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_missing_development_certificates_are_not_created(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAVEN_DEV_CERTS_DIR", str(tmp_path / "certs"))
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 1
    assert f"no development certificates in {tmp_path / 'certs'}" in result.output
    assert "`make certs`" in result.output
    assert not (tmp_path / "certs").exists()


def test_an_unusable_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAVEN_INSECURE_DEV", "maybe")
    result = CliRunner().invoke(app, ["runs", "list"])
    assert result.exit_code == 1
    assert "RAVEN_INSECURE_DEV='maybe': expected true or false" in result.output
    assert "Traceback" not in result.output


def test_field_violations_are_printed(
    monkeypatch: pytest.MonkeyPatch, refusing_server: str
) -> None:
    monkeypatch.setenv("RAVEN_TRAINING_RUNS_ADDR", refusing_server)
    # The stand-in server is plaintext on loopback, what development mode allows.
    monkeypatch.setenv("RAVEN_INSECURE_DEV", "true")
    result = CliRunner().invoke(app, ["runs", "get", "nope"])
    assert result.exit_code == 1
    assert "INVALID_ARGUMENT: invalid request" in result.output
    assert "name: expected trainingRuns/{uuid}, got 'trainingRuns/nope'" in result.output
    assert "Traceback" not in result.output


def test_create_has_an_image_root_option() -> None:
    result = CliRunner().invoke(app, ["runs", "create", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--image-root" in result.output
