"""Fixtures of the integration and end-to-end suites: real Postgres and NATS (the
configured ones, or embedded ones when none answers), a fresh database and NATS
namespace per session, and both gRPC services running in-process on free ports.

A plugin that tests/conftest.py loads for every run but a unit-only one, so that
unit tests import neither grpc, nats nor SQLAlchemy."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import nats
import pytest

from services.trained_models.main import TrainedModelsApp
from services.training_runs.main import TrainingRunsApp
from shared.infra import Infrastructure, create_database, drop_database, ensure_infrastructure
from shared.messaging import Subjects, ensure_streams
from shared.proto.raven.training.v1 import trained_model_pb2_grpc, training_run_pb2_grpc
from shared.runtime import ServiceApp
from shared.settings import Settings
from tests import pki as test_pki
from tests import s3 as test_s3

Channel = grpc.aio.Channel


@pytest.fixture(scope="session")
def infrastructure(tmp_path_factory: pytest.TempPathFactory) -> Infrastructure:
    data_dir = Path(os.environ.get("RAVEN_TEST_DATA_DIR") or tmp_path_factory.mktemp("infra"))
    return ensure_infrastructure(Settings(), data_dir, keep_running=False)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> test_pki.Pki:
    """The session's CA, server certificate, policy file and JWT keys (tests/pki.py)."""
    return test_pki.Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def s3() -> Iterator[test_s3.S3Server]:
    """moto's S3 server on loopback (tests/s3.py); started only by the tests that use it."""
    with test_s3.running_s3() as server:
        yield server


@pytest.fixture(scope="session")
def settings(
    infrastructure: Infrastructure,
    tmp_path_factory: pytest.TempPathFactory,
    pki: test_pki.Pki,
) -> Iterator[Settings]:
    """Settings of this test session: its own database, NATS namespace and artifact root."""
    suffix = uuid.uuid4().hex[:10]
    database = f"raven_test_{suffix}"
    url = create_database(infrastructure.database_url, database)
    yield Settings(
        database_url=url,
        nats_url=infrastructure.nats_url,
        nats_namespace=f"test{suffix}",
        artifact_root=tmp_path_factory.mktemp("artifacts"),
        training_runs_addr="127.0.0.1:0",
        trained_models_addr="127.0.0.1:0",
        job_ack_wait_s=20,
        # Both servers serve mTLS; the stubs below call as a client the policy makes `admin`.
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_ca_file=pki.ca_file,
        auth_policy_file=pki.policy_file,
        auth_policy_check_interval_s=0,
        trusted_proxies=[test_pki.PROXY],
        jwt_issuer=test_pki.ISSUER,
        jwt_audience=test_pki.AUDIENCE,
        jwt_public_key_files=pki.jwt_key_files,
    )
    drop_database(infrastructure.database_url, database)


@pytest.fixture(scope="session")
def subjects(settings: Settings) -> Subjects:
    return Subjects(settings.nats_namespace)


@pytest.fixture(scope="session")
async def nc(settings: Settings, subjects: Subjects) -> AsyncIterator[nats.NATS]:
    connection = await nats.connect(settings.nats_url)
    await ensure_streams(connection.jetstream(), subjects)
    yield connection
    js = connection.jetstream()
    for stream in (subjects.jobs_stream, subjects.worker_events_stream, subjects.events_stream):
        try:
            await js.delete_stream(stream)
        except Exception:
            pass
    await connection.close()


@contextlib.asynccontextmanager
async def _serving(app: ServiceApp) -> AsyncIterator[None]:
    await app.start()
    try:
        yield
    finally:
        await app.stop(grace_s=1)


@pytest.fixture(scope="session")
async def training_runs(settings: Settings, nc: nats.NATS) -> AsyncIterator[TrainingRunsApp]:
    app = TrainingRunsApp(settings)
    async with _serving(app):
        yield app


@pytest.fixture(scope="session")
async def trained_models(settings: Settings, nc: nats.NATS) -> AsyncIterator[TrainedModelsApp]:
    app = TrainedModelsApp(settings)
    async with _serving(app):
        yield app


@pytest.fixture(scope="session")
async def runs_channel(training_runs: ServiceApp, pki: test_pki.Pki) -> AsyncIterator[Channel]:
    async with pki.channel(training_runs.port, test_pki.ADMIN) as channel:
        yield channel


@pytest.fixture(scope="session")
async def models_channel(trained_models: ServiceApp, pki: test_pki.Pki) -> AsyncIterator[Channel]:
    async with pki.channel(trained_models.port, test_pki.ADMIN) as channel:
        yield channel


@pytest.fixture
def runs(runs_channel: Channel) -> training_run_pb2_grpc.TrainingRunServiceStub:
    return training_run_pb2_grpc.TrainingRunServiceStub(runs_channel)


@pytest.fixture
def models(models_channel: Channel) -> trained_model_pb2_grpc.TrainedModelServiceStub:
    return trained_model_pb2_grpc.TrainedModelServiceStub(models_channel)


@pytest.fixture
def js(nc: nats.NATS) -> nats.js.JetStreamContext:
    return nc.jetstream()
