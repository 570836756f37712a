"""The services with datasets and artifacts in S3 (moto's server on loopback): the dataset
check at creation, a model whose files are s3:// objects (download, publication gate,
fine-tuning), imports into the artifact store, and deletions, which remove objects under
the artifact store only."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.trained_models import handlers as models_handlers
from services.trained_models import importing
from services.trained_models.domain import TrainedModel
from services.trained_models.unit_of_work import UnitOfWork as ModelsUnitOfWork
from services.training_runs import handlers
from services.training_runs.spec import SpecRequest
from services.training_runs.unit_of_work import UnitOfWork
from shared.db.engine import create_engine, session_factory
from shared.errors import InvalidArgument, Unavailable
from shared.names import TRAINED_MODELS, TRAINING_RUNS, parse_name
from shared.proto.raven.training.v1 import common_pb2, training_run_pb2, worker_pb2
from shared.proto.raven.training.v1 import trained_model_pb2 as pb
from shared.settings import Settings
from shared.storage import S3Store, Storage
from tests.s3 import S3Server
from tests.support import WorkerDriver, create_request, eventually, violations

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[2]
TrainingRun = training_run_pb2.TrainingRun
FIELD = "training_run.spec.dataset_uri"


@pytest.fixture
def prefix() -> str:
    return f"api-{uuid.uuid4().hex[:8]}/"


@pytest.fixture(scope="module")
async def sessions(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(settings.database_url, pool_size=2)
    yield session_factory(engine)
    await engine.dispose()


@pytest.fixture
def uow_factory(sessions, subjects) -> Callable[[], UnitOfWork]:
    return lambda: UnitOfWork(sessions, subjects)


@pytest.fixture
def models_uow_factory(sessions, subjects) -> Callable[[], ModelsUnitOfWork]:
    return lambda: ModelsUnitOfWork(sessions, subjects)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_dataset_on_s3_must_exist_when_the_run_is_created(runs, s3: S3Server, prefix):
    uri = s3.uri(prefix + "annotations.json")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.CreateTrainingRun(create_request(uri))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"no annotation file at {uri!r}" in violations(caught.value)[FIELD]

    s3.put(prefix + "annotations.json", b'{"images": [], "annotations": [], "categories": []}')
    request = create_request(uri)
    request.training_run.spec.image_root = s3.uri(prefix + "images/")
    run = await runs.CreateTrainingRun(request)
    assert run.spec.dataset_uri == uri and run.spec.image_root == s3.uri(prefix + "images/")
    await runs.CancelTrainingRun(training_run_pb2.CancelTrainingRunRequest(name=run.name))

    request = create_request(uri)
    request.training_run.spec.image_root = "gs://elsewhere/images/"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.CreateTrainingRun(request)
    assert "not supported" in violations(caught.value)["training_run.spec.image_root"]


async def test_an_unreachable_store_is_a_violation_not_a_crash(uow_factory, settings, s3):
    storage = Storage(
        artifact_root=settings.artifact_root,
        s3=S3Store(endpoint_url=f"http://127.0.0.1:{closed_port()}"),
    )
    uri = s3.uri("somewhere/annotations.json")
    command = handlers.CreateRun(
        display_name="unreachable",
        labels={},
        spec=SpecRequest(dataset_uri=uri, architecture="retinanet_r18_fpn"),
        base_model="",
        request_id="",
        creator="tests",
        request_hash="x",
    )
    with pytest.raises(InvalidArgument) as caught:
        await handlers.create_run(uow_factory(), command, storage=storage)
    (violation,) = caught.value.violations
    assert violation.field == FIELD
    assert "cannot check the annotation file" in violation.description
    assert uri in violation.description


async def _succeeded_with(runs, js, subjects, dataset_uri, artifacts) -> TrainingRun:
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    worker = WorkerDriver(js, subjects, run)
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
    await worker.send(
        succeeded=worker_pb2.WorkerEvent.Succeeded(
            artifacts=artifacts,
            facts=common_pb2.TrainingFacts(epochs_trained=1, best_epoch=1, device="cpu"),
            evaluation=common_pb2.Evaluation(epoch=1, split="val", metrics={"coco/bbox_mAP": 0.1}),
        )
    )
    return run


async def _download(
    models, name: str, kind: str = "checkpoint"
) -> tuple[common_pb2.Artifact, bytes]:
    header, data = None, b""
    stream = models.DownloadTrainedModel(
        pb.DownloadTrainedModelRequest(name=name, artifact_kind=kind)
    )
    async for part in stream:
        if part.WhichOneof("part") == "artifact":
            header = part.artifact
        else:
            data += part.chunk
    assert header is not None
    return header, data


async def _refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


async def test_a_model_stored_in_s3(runs, models, js, subjects, s3: S3Server, prefix, dataset_uri):
    checkpoint = uuid.uuid4().bytes * 100_000  # 1.6 MB: several chunks
    files = {
        "config": ("config.py", b"model = dict(type='RetinaNet')\n"),
        "checkpoint": ("checkpoint.pth", checkpoint),
    }
    artifacts = [
        common_pb2.Artifact(
            kind=kind,
            uri=s3.put(prefix + name, data),
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        for kind, (name, data) in files.items()
    ]
    run = await _succeeded_with(runs, js, subjects, dataset_uri, artifacts)

    async def registered() -> str:
        return (
            await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
        ).trained_model

    name = await eventually(registered, timeout=15)

    # Download streams the object.
    header, data = await _download(models, name)
    assert header.uri == s3.uri(prefix + "checkpoint.pth")
    assert data == checkpoint and hashlib.sha256(data).hexdigest() == header.sha256

    # The publication gate reads the objects: a missing or changed one is refused.
    key = prefix + "checkpoint.pth"
    channel = f"s3-{uuid.uuid4().hex[:8]}"
    publish = pb.PublishTrainedModelRequest(name=name, channel=channel, reason="s3")
    s3.client().delete_object(Bucket=s3.bucket, Key=key)
    FAILED = grpc.StatusCode.FAILED_PRECONDITION
    assert "is missing" in await _refused(models.PublishTrainedModel(publish), FAILED)
    assert "is missing" in await _refused(_download(models, name), FAILED)
    tampered = bytearray(checkpoint)
    tampered[1000] ^= 0xFF
    s3.put(key, bytes(tampered))
    assert "sha256" in await _refused(models.PublishTrainedModel(publish), FAILED)
    s3.put(key, checkpoint)
    assert (await models.PublishTrainedModel(publish)).publication.published
    await models.UnpublishTrainedModel(pb.UnpublishTrainedModelRequest(name=name))

    # A fine-tune checks that the base model's objects exist.
    fine_tune = create_request(dataset_uri, architecture="")
    fine_tune.training_run.base_model = name
    child = await runs.CreateTrainingRun(fine_tune)
    await runs.CancelTrainingRun(training_run_pb2.CancelTrainingRunRequest(name=child.name))
    s3.client().delete_object(Bucket=s3.bucket, Key=prefix + "config.py")
    fine_tune.request_id = str(uuid.uuid4())
    details = await _refused(runs.CreateTrainingRun(fine_tune), grpc.StatusCode.NOT_FOUND)
    assert "lost its config" in details

    # This service stores new artifacts under its artifact root: objects elsewhere are not
    # its to delete.
    s3.put(prefix + "config.py", files["config"][1])
    await models.DeleteTrainedModel(pb.DeleteTrainedModelRequest(name=name))
    assert s3.keys(prefix) == [prefix + "checkpoint.pth", prefix + "config.py"]


async def test_deleting_a_model_deletes_its_objects_in_the_artifact_store(
    runs, models_uow_factory, js, subjects, settings, s3: S3Server, prefix, dataset_uri
):
    artifacts = [
        common_pb2.Artifact(
            kind=kind,
            uri=s3.put(f"{prefix}store/models/m/{kind}", kind.encode()),
            size_bytes=len(kind),
            sha256=hashlib.sha256(kind.encode()).hexdigest(),
        )
        for kind in ("config", "checkpoint")
    ]
    run = await _succeeded_with(runs, js, subjects, dataset_uri, artifacts)

    async def registered() -> str:
        again = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
        return again.trained_model

    model_id = parse_name(await eventually(registered, timeout=15), TRAINED_MODELS)
    storage = Storage(
        artifact_root=settings.artifact_root,
        artifact_store=s3.uri(prefix + "store"),
        s3=S3Store(endpoint_url=s3.endpoint),
    )
    await models_handlers.delete_model(
        models_uow_factory(), model_id, etag="", actor="tests", storage=storage
    )
    assert s3.keys(prefix) == []


async def test_deleting_a_run_deletes_its_stored_checkpoints(
    runs, uow_factory, settings, s3: S3Server, prefix, dataset_uri
):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    await runs.CancelTrainingRun(training_run_pb2.CancelTrainingRunRequest(name=run.name))
    run_id = parse_name(run.name, TRAINING_RUNS)
    s3.put(f"{prefix}runs/{run_id}/attempt-1/epoch_1.pth", b"1")
    s3.put(f"{prefix}runs/{run_id}/attempt-2/epoch_2.pth", b"2")
    s3.put(f"{prefix}runs/{uuid.uuid4()}/attempt-1/epoch_1.pth", b"another run's")
    storage = Storage(
        artifact_root=settings.artifact_root,
        artifact_store=s3.uri(prefix.rstrip("/")),
        s3=S3Store(endpoint_url=s3.endpoint),
    )
    await handlers.delete_run(uow_factory(), run_id, etag="", storage=storage)
    assert s3.keys(f"{prefix}runs/{run_id}/") == []
    assert len(s3.keys(f"{prefix}runs/")) == 1, "other runs keep theirs"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny, random) RetinaNet: config, checkpoint and a truncated checkpoint."""
    folder = tmp_path_factory.mktemp("model")
    subprocess.run(
        [sys.executable, "-m", "tests.checkpoints", str(folder)], check=True, cwd=ROOT, timeout=120
    )
    return folder


def _s3_storage(root: Path, s3: S3Server, prefix: str, endpoint: str = "") -> Storage:
    return Storage(
        artifact_root=root,
        artifact_store=s3.uri(prefix + "store"),
        s3=S3Store(endpoint_url=endpoint or s3.endpoint),
    )


async def _import(
    uow_factory: Callable[[], ModelsUnitOfWork],
    storage: Storage,
    files: dict[str, Path] | None = None,
    **metadata: Any,
) -> TrainedModel:
    async def parts() -> AsyncIterator[importing.Part]:
        for kind, path in (files or {}).items():
            yield kind, path.read_bytes()

    command = importing.ImportCommand(
        display_name="imported",
        architecture="retinanet_r18_fpn",
        classes=["dump", "tire"],
        creator="tests",
        **metadata,
    )
    policy = importing.ImportPolicy(storage=storage, verify_timeout_s=120, max_bytes=1 << 30)
    return await importing.import_model(uow_factory, command, parts(), policy)


def _local_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("trained_models")
async def test_an_uploaded_model_is_imported_into_the_artifact_store(
    models_uow_factory, s3: S3Server, prefix, model_files, tmp_path
):
    storage = _s3_storage(tmp_path, s3, prefix)
    upload = {"config": model_files / "config.py", "checkpoint": model_files / "checkpoint.pth"}
    # Two imports with one request_id race: the loser removes the objects it uploaded.
    request_id = str(uuid.uuid4())
    first, second = await asyncio.gather(
        *(_import(models_uow_factory, storage, upload, request_id=request_id) for _ in range(2))
    )
    assert first.id == second.id
    folder = f"{prefix}store/models/{first.id}/"
    assert s3.keys(prefix) == [folder + "checkpoint.pth", folder + "config.py"]
    for artifact in first.artifacts:
        key = folder + upload[artifact["kind"]].name
        data = upload[artifact["kind"]].read_bytes()
        assert artifact["uri"] == s3.uri(key)
        assert artifact["sha256"] == hashlib.sha256(data).hexdigest() == s3.sha256(key)
        assert int(artifact["size_bytes"]) == len(data) == len(s3.get(key))
    assert _local_files(tmp_path) == [], "no copy is left under the artifact root"


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("trained_models")
async def test_a_model_is_imported_from_s3_uris(
    models_uow_factory, s3: S3Server, prefix, model_files, tmp_path
):
    storage = _s3_storage(tmp_path, s3, prefix)
    checkpoint_data = (model_files / "checkpoint.pth").read_bytes()
    config = s3.put(f"{prefix}store/incoming/config.py", (model_files / "config.py").read_bytes())
    checkpoint = s3.put(f"{prefix}store/incoming/checkpoint.pth", checkpoint_data)
    model = await _import(models_uow_factory, storage, config_uri=config, checkpoint_uri=checkpoint)
    key = f"{prefix}store/models/{model.id}/checkpoint.pth"
    assert model.artifact("checkpoint") == {
        "kind": "checkpoint",
        "uri": s3.uri(key),
        "size_bytes": str(len(checkpoint_data)),
        "sha256": hashlib.sha256(checkpoint_data).hexdigest(),
    }
    assert s3.get(key) == checkpoint_data
    assert len(s3.keys(f"{prefix}store/incoming/")) == 2, "the caller's objects stay"

    async def refused(**uris: str) -> tuple[str, str]:
        with pytest.raises(InvalidArgument) as caught:
            await _import(models_uow_factory, storage, **uris)
        ((field, description),) = [(v.field, v.description) for v in caught.value.violations]
        return field, description

    missing = s3.uri(f"{prefix}store/incoming/absent.pth")
    assert await refused(config_uri=config, checkpoint_uri=missing) == (
        "metadata.checkpoint_uri",
        f"{missing} does not exist",
    )
    elsewhere = s3.put(f"{prefix}elsewhere/config.py", b"model = dict()\n")
    assert await refused(config_uri=elsewhere, checkpoint_uri=checkpoint) == (
        "metadata.config_uri",
        "not a file in the artifact store",
    )

    unreachable = _s3_storage(tmp_path, s3, prefix, endpoint=f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(Unavailable) as failed:
        await _import(models_uow_factory, unreachable, config_uri=config, checkpoint_uri=checkpoint)
    assert config in failed.value.message
    assert s3.keys(f"{prefix}store/models/") == [key, key.replace("checkpoint.pth", "config.py")]
    assert _local_files(tmp_path) == []


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("trained_models")
async def test_a_bad_upload_leaves_nothing_in_the_artifact_store(
    models_uow_factory, s3: S3Server, prefix, model_files, tmp_path
):
    storage = _s3_storage(tmp_path, s3, prefix)
    upload = {"config": model_files / "config.py", "checkpoint": model_files / "truncated.pth"}
    with pytest.raises(InvalidArgument) as caught:
        await _import(models_uow_factory, storage, upload)
    (violation,) = caught.value.violations
    assert violation.field == "checkpoint_chunk" and "cannot be loaded" in violation.description
    assert s3.keys(prefix) == []
    assert _local_files(tmp_path) == []
