"""TrainedModelService over real gRPC, Postgres and JetStream: publication gate and
channels, lineage, deletion, import, download, registration.

Runs are driven to their end by publishing WorkerEvents as a trainer worker does;
their artifact files are written here, under the session's artifact root.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import create_async_engine

from shared.db.schema import trained_models as trained_models_table
from shared.messaging import Subjects
from shared.proto.raven.training.v1 import (
    common_pb2,
    trained_model_pb2,
    training_run_pb2,
    worker_pb2,
)
from shared.settings import Settings
from tests.support import WorkerDriver, create_request, eventually, violations

TrainingRun = training_run_pb2.TrainingRun
pb = trained_model_pb2
pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset_uri(settings: Settings) -> str:
    path = Path(settings.artifact_root) / "datasets" / "models-api" / "annotations.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return "datasets/models-api/annotations.json"


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[object]:
    engine = create_async_engine(settings.database_url)
    yield engine
    await engine.dispose()


def _artifact(kind: str, path: Path) -> common_pb2.Artifact:
    data = path.read_bytes()
    return common_pb2.Artifact(
        kind=kind,
        uri=path.as_uri(),
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


class Registry:
    """Drives runs to SUCCEEDED (or FAILED) and waits for their models."""

    def __init__(self, runs, models, js, subjects: Subjects, settings: Settings, dataset_uri):
        self.runs, self.models, self.js, self.subjects = runs, models, js, subjects
        self.root = Path(settings.artifact_root)
        self.dataset_uri = dataset_uri

    async def start(self, *, base_model: str = "") -> tuple[TrainingRun, WorkerDriver]:
        request = create_request(self.dataset_uri)
        request.training_run.base_model = base_model
        run = await self.runs.CreateTrainingRun(request)
        worker = WorkerDriver(self.js, self.subjects, run)
        await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
        await worker.send(
            dataset_prepared=common_pb2.DatasetSummary(
                fingerprint=f"fp-{run.name[-6:]}", image_count=16, classes=["dump", "tire"]
            )
        )
        await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
        return run, worker

    async def model(
        self,
        *,
        base_model: str = "",
        metrics: dict[str, float] | None = None,
        test_evaluation: common_pb2.Evaluation | None = None,
    ) -> pb.TrainedModel:
        run, worker = await self.start(base_model=base_model)
        folder = self.root / "models" / run.name.split("/")[1]
        folder.mkdir(parents=True)
        (folder / "config.py").write_text("model = dict(type='RetinaNet')\n")
        (folder / "checkpoint.pth").write_bytes(uuid.uuid4().bytes * 40_000)
        evaluation = common_pb2.Evaluation(
            epoch=2,
            split="val",
            metrics={"coco/bbox_mAP": 0.25} if metrics is None else metrics,
            per_class_ap={"dump": 0.3, "tire": -1.0},
            iou_thresholds=[0.5 + 0.05 * i for i in range(10)],
            image_count=4,
        )
        succeeded = worker_pb2.WorkerEvent.Succeeded(
            artifacts=[
                _artifact("config", folder / "config.py"),
                _artifact("checkpoint", folder / "checkpoint.pth"),
            ],
            facts=common_pb2.TrainingFacts(epochs_trained=2, best_epoch=2, device="cpu"),
            evaluation=evaluation,
        )
        if test_evaluation is not None:
            succeeded.test_evaluation.CopyFrom(test_evaluation)
        await worker.send(succeeded=succeeded)
        return await eventually(lambda: self.model_of(run.name), timeout=15)

    async def model_of(self, run_name: str) -> pb.TrainedModel | None:
        found = await self.models.ListTrainedModels(
            pb.ListTrainedModelsRequest(training_run=run_name)
        )
        return found.trained_models[0] if found.trained_models else None

    async def registry_idle(self) -> bool:
        info = await self.js.consumer_info(
            self.subjects.events_stream, self.subjects.model_registry_consumer
        )
        return info.num_pending == 0 and info.num_ack_pending == 0


@pytest.fixture
def registry(runs, models, js, subjects, settings, dataset_uri) -> Registry:
    return Registry(runs, models, js, subjects, settings, dataset_uri)


def _path(artifact: common_pb2.Artifact) -> Path:
    return Path(artifact.uri.removeprefix("file://"))


def _checkpoint(model: pb.TrainedModel) -> common_pb2.Artifact:
    return next(a for a in model.artifacts if a.kind == "checkpoint")


async def _refused(call, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


# Publication gate


async def test_publish_gate_refuses_missing_and_tampered_artifacts_and_a_low_map(models, registry):
    model = await registry.model()
    checkpoint = _path(_checkpoint(model))
    original = checkpoint.read_bytes()
    channel = f"gate-{uuid.uuid4().hex[:8]}"
    publish = pb.PublishTrainedModelRequest(name=model.name, channel=channel, reason="gate")

    checkpoint.unlink()
    assert "checkpoint artifact" in await _refused(models.PublishTrainedModel(publish))
    assert "is missing" in await _refused(models.PublishTrainedModel(publish))

    tampered = bytearray(original)
    tampered[100] ^= 0xFF
    checkpoint.write_bytes(bytes(tampered))
    assert "sha256" in await _refused(models.PublishTrainedModel(publish))

    checkpoint.write_bytes(original)
    publish.min_bbox_map = 0.5
    assert "below the required 0.5" in await _refused(models.PublishTrainedModel(publish))
    publish.evaluation_split = "test"
    publish.min_bbox_map = 0.2
    assert "relies on a test evaluation" in await _refused(models.PublishTrainedModel(publish))

    publish.evaluation_split = "val"
    published = await models.PublishTrainedModel(publish)
    assert published.publication.published and published.publication.channel == channel
    assert published.publication.published_by, "the caller is recorded"
    assert published.etag != model.etag
    history = await models.ListPublicationEvents(
        pb.ListPublicationEventsRequest(trained_model=model.name)
    )
    assert [(e.action, e.reason, e.bbox_map) for e in history.events] == [
        ("published", "gate", pytest.approx(0.25))
    ]


async def test_a_run_that_did_not_succeed_registers_nothing_and_cannot_be_published(
    runs, models, registry, js, subjects, db
):
    run, worker = await registry.start()
    await worker.send(failed=training_run_pb2.Failure(reason="training_crashed", message="x"))
    failed = await eventually(lambda: _in_state(runs, run.name, TrainingRun.FAILED), timeout=10)
    assert failed.trained_model == "", "a failed run has no model (not its base model)"

    # A stale or forged completion event for it: the database says FAILED, nothing registers.
    forged = TrainingRun()
    forged.CopyFrom(failed)
    forged.state = TrainingRun.SUCCEEDED
    await js.publish(
        subjects.run_lifecycle("succeeded"),
        training_run_pb2.TrainingRunStateChanged(
            event_id=f"forged-{uuid.uuid4()}", training_run=forged
        ).SerializeToString(),
    )
    await eventually(registry.registry_idle, timeout=10)
    assert await registry.model_of(run.name) is None

    # A model row tied to that run (however it got there) does not pass the gate.
    valid = await registry.model()
    model_id = uuid.uuid4()
    async with db.begin() as connection:
        row = (
            (
                await connection.execute(
                    select(trained_models_table).where(
                        trained_models_table.c.id == uuid.UUID(valid.name.split("/")[1])
                    )
                )
            )
            .one()
            ._asdict()
        )
        row.update(id=model_id, training_run_id=uuid.UUID(run.name.split("/")[1]))
        await connection.execute(insert(trained_models_table).values(**row))
    details = await _refused(
        models.PublishTrainedModel(
            pb.PublishTrainedModelRequest(name=f"trainedModels/{model_id}", channel="gate")
        )
    )
    assert "which is FAILED, not SUCCEEDED" in details


async def test_a_model_without_map_keeps_minus_one_and_absence_apart(models, registry):
    model = await registry.model(metrics={"coco/bbox_mAP_l": -1.0, "coco/bbox_mAP_50": 0.0})
    metrics = dict(model.evaluation.metrics)
    assert metrics == {"coco/bbox_mAP_l": -1.0, "coco/bbox_mAP_50": 0.0}
    assert "coco/bbox_mAP" not in metrics, "no mAP is not a mAP of 0"
    assert dict(model.evaluation.per_class_ap) == {"dump": pytest.approx(0.3), "tire": -1.0}
    assert len(model.evaluation.iou_thresholds) == 10 and model.evaluation.image_count == 4
    lineage = await models.GetTrainedModelLineage(pb.GetTrainedModelLineageRequest(name=model.name))
    assert not lineage.ancestors[0].HasField("bbox_map")
    details = await _refused(
        models.PublishTrainedModel(
            pb.PublishTrainedModelRequest(name=model.name, channel="nomap", min_bbox_map=0.01)
        )
    )
    assert "has no coco/bbox_mAP" in details


async def test_a_model_with_a_test_split_is_judged_by_its_test_evaluation(runs, models, registry):
    plain = await registry.model()
    assert plain.evaluation.split == "val" and plain.val_evaluation == plain.evaluation

    test = common_pb2.Evaluation(
        epoch=2, split="test", metrics={"coco/bbox_mAP": 0.15}, per_class_ap={"dump": 0.2}
    )
    test.image_count = 3
    model = await registry.model(test_evaluation=test)
    assert model.evaluation == test
    assert model.val_evaluation.split == "val"
    assert model.val_evaluation.metrics["coco/bbox_mAP"] == pytest.approx(0.25)
    run = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=model.training_run))
    assert run.test_evaluation == test and run.best_evaluation == model.val_evaluation

    channel = f"tested-{uuid.uuid4().hex[:8]}"
    publish = pb.PublishTrainedModelRequest(
        name=model.name, channel=channel, reason="test split", min_bbox_map=0.2
    )
    # The test mAP (0.15) decides, not the validation's (0.25) that chose the checkpoint.
    assert "below the required 0.2" in await _refused(models.PublishTrainedModel(publish))
    publish.min_bbox_map = 0.1
    publish.evaluation_split = "val"
    assert "relies on a val evaluation" in await _refused(models.PublishTrainedModel(publish))
    publish.evaluation_split = "test"
    publish.evaluation_epoch = 2
    published = await models.PublishTrainedModel(publish)
    assert published.publication.channel == channel


# Channels


async def test_two_concurrent_publishes_to_one_channel_leave_one_model_there(
    models, registry, js, subjects
):
    first, second = await asyncio.gather(registry.model(), registry.model())
    channel = f"race-{uuid.uuid4().hex[:8]}"
    announced = await js.subscribe(subjects.model_lifecycle("published"), ordered_consumer=True)

    results = await asyncio.gather(
        *(
            models.PublishTrainedModel(
                pb.PublishTrainedModelRequest(name=m.name, channel=channel, reason="race")
            )
            for m in (first, second)
        )
    )
    assert all(r.publication.channel == channel for r in results)

    in_channel = [
        m
        for m in (
            await models.ListTrainedModels(pb.ListTrainedModelsRequest(published=True))
        ).trained_models
        if m.publication.channel == channel
    ]
    assert len(in_channel) == 1
    winner = in_channel[0].name
    loser = first.name if winner == second.name else second.name
    history = (
        await models.ListPublicationEvents(pb.ListPublicationEventsRequest(channel=channel))
    ).events
    # Newest first: the last publication replaced the first one.
    assert [(e.action, e.trained_model) for e in history] == [
        ("published", winner),
        ("unpublished", loser),
        ("published", loser),
    ]
    assert history[0].replaced_model == loser and history[2].replaced_model == ""
    page = await models.ListPublicationEvents(
        pb.ListPublicationEventsRequest(channel=channel, page_size=2)
    )
    rest = await models.ListPublicationEvents(
        pb.ListPublicationEventsRequest(
            channel=channel, page_size=2, page_token=page.next_page_token
        )
    )
    assert [e.action for e in [*page.events, *rest.events]] == [e.action for e in history]
    assert rest.next_page_token == ""

    # Both publications were announced (the stream also holds other tests' events).
    names: set[str] = set()
    while not {first.name, second.name} <= names:
        message = await announced.next_msg(timeout=10)
        names.add(pb.TrainedModel.FromString(message.data).name)
    await announced.unsubscribe()


# Lineage and deletion


async def test_lineage_of_a_three_level_tree_with_a_sibling(models, registry):
    root = await registry.model()
    child = await registry.model(base_model=root.name)
    sibling = await registry.model(base_model=root.name)
    grandchild = await registry.model(base_model=child.name)

    up = await models.GetTrainedModelLineage(pb.GetTrainedModelLineageRequest(name=grandchild.name))
    assert [(n.trained_model, n.depth) for n in up.ancestors] == [
        (grandchild.name, 0),
        (child.name, 1),
        (root.name, 2),
    ]
    assert up.ancestors[1].training_run == child.training_run
    assert up.ancestors[2].dataset_fingerprint == root.dataset_fingerprint
    assert up.ancestors[0].bbox_map == pytest.approx(0.25)

    down = await models.GetTrainedModelLineage(pb.GetTrainedModelLineageRequest(name=root.name))
    assert [(n.trained_model, n.base_model, n.depth) for n in down.descendants] == [
        (child.name, root.name, 1),
        (sibling.name, root.name, 1),
        (grandchild.name, child.name, 2),
    ]
    shallow = await models.GetTrainedModelLineage(
        pb.GetTrainedModelLineageRequest(name=root.name, descendant_depth=1)
    )
    assert {n.trained_model for n in shallow.descendants} == {child.name, sibling.name}
    children = await models.ListTrainedModels(
        pb.ListTrainedModelsRequest(base_model=root.name, class_name="tire")
    )
    assert {m.name for m in children.trained_models} == {child.name, sibling.name}


async def test_each_deletion_blocker_is_named(runs, models, registry, settings):
    root = await registry.model()
    child = await registry.model(base_model=root.name)
    delete = pb.DeleteTrainedModelRequest

    details = await _refused(models.DeleteTrainedModel(delete(name=root.name)))
    assert f"base model of {child.name}" in details

    await models.PublishTrainedModel(
        pb.PublishTrainedModelRequest(name=child.name, channel=f"del-{uuid.uuid4().hex[:6]}")
    )
    details = await _refused(models.DeleteTrainedModel(delete(name=child.name)))
    assert "is published in channel" in details
    unpublished = await models.UnpublishTrainedModel(
        pb.UnpublishTrainedModelRequest(name=child.name, reason="retire")
    )
    assert not unpublished.publication.published

    running, worker = await registry.start(base_model=child.name)
    details = await _refused(models.DeleteTrainedModel(delete(name=child.name)))
    # Whatever state the worker's reports have brought it to yet.
    assert f"base model of {running.name}, which is " in details
    assert "has not finished" in details
    await runs.CancelTrainingRun(training_run_pb2.CancelTrainingRunRequest(name=running.name))
    await worker.send(cancelled=worker_pb2.WorkerEvent.Cancelled())
    await eventually(lambda: _in_state(runs, running.name, TrainingRun.CANCELLED), timeout=10)

    stale = await _refused(
        models.DeleteTrainedModel(delete(name=child.name, etag='"999"')), grpc.StatusCode.ABORTED
    )
    assert "was changed" in stale

    # Once nothing blocks: the row goes, then the files; the finished run keeps its history.
    await models.DeleteTrainedModel(delete(name=child.name))
    files = [_path(a) for a in child.artifacts]
    assert not any(f.exists() for f in files)
    await _refused(
        models.GetTrainedModel(pb.GetTrainedModelRequest(name=child.name)),
        grpc.StatusCode.NOT_FOUND,
    )
    await models.DeleteTrainedModel(delete(name=root.name))
    produced = await runs.GetTrainingRun(
        training_run_pb2.GetTrainingRunRequest(name=root.training_run)
    )
    assert produced.trained_model == ""


async def _in_state(runs, name: str, state: int) -> TrainingRun | None:
    run = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=name))
    return run if run.state == state else None


# Registration


async def test_a_duplicated_completion_event_registers_one_model(runs, registry, js, subjects):
    model = await registry.model()
    run = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=model.training_run))
    again = training_run_pb2.TrainingRunStateChanged(
        event_id=f"{run.name}.again", training_run=run
    ).SerializeToString()
    for _ in range(2):
        await js.publish(subjects.run_lifecycle("succeeded"), again)
    await eventually(registry.registry_idle, timeout=10)
    found = await registry.models.ListTrainedModels(
        pb.ListTrainedModelsRequest(training_run=run.name)
    )
    assert [m.name for m in found.trained_models] == [model.name]
    assert run.trained_model == model.name


# Update


async def test_update_honours_the_mask_and_the_etag(models, registry):
    model = await registry.model()
    update = pb.UpdateTrainedModelRequest(
        trained_model=pb.TrainedModel(
            name=model.name,
            display_name="renamed",
            description="ignored: not in the mask",
            labels={"team": "vision"},
            etag=model.etag,
        ),
        update_mask=FieldMask(paths=["display_name", "labels"]),
    )
    updated = await models.UpdateTrainedModel(update)
    assert updated.display_name == "renamed" and dict(updated.labels) == {"team": "vision"}
    assert updated.description == model.description and updated.etag != model.etag

    details = await _refused(models.UpdateTrainedModel(update), grpc.StatusCode.ABORTED)
    assert "was changed" in details
    update.trained_model.etag = updated.etag
    update.update_mask.paths[:] = ["architecture"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await models.UpdateTrainedModel(update)
    assert "cannot be changed" in violations(caught.value)["update_mask"]


# Import and download


@pytest.fixture(scope="module")
def model_files(settings: Settings) -> Path:
    """A real (tiny, random) RetinaNet: config, checkpoint, a misfit and a truncated one."""
    folder = Path(settings.artifact_root) / "incoming"
    subprocess.run(
        [sys.executable, "-m", "tests.checkpoints", str(folder)], check=True, cwd=ROOT, timeout=120
    )
    return folder


def _upload(
    config: Path, checkpoint: Path, **metadata: object
) -> list[pb.ImportTrainedModelRequest]:
    fields = {"display_name": "imported", "architecture": "retinanet_r18_fpn"}
    fields |= {"classes": ["dump", "tire"], **metadata}
    messages = [
        pb.ImportTrainedModelRequest(metadata=pb.ImportTrainedModelRequest.Metadata(**fields))
    ]
    messages.append(pb.ImportTrainedModelRequest(config_chunk=config.read_bytes()))
    data = checkpoint.read_bytes()
    step = 1024 * 1024
    messages += [
        pb.ImportTrainedModelRequest(checkpoint_chunk=data[i : i + step])
        for i in range(0, len(data), step)
    ]
    return messages


async def _stream(messages):
    for message in messages:
        yield message


def _leftovers(root: Path) -> set[str]:
    uploads = root / "uploads"
    models_dir = root / "models"
    return {
        *(f"uploads/{p.name}" for p in uploads.glob("*")),
        *(f"models/{p.name}" for p in models_dir.glob("*")),
    }


@pytest.mark.timeout(180)
async def test_import_of_a_valid_checkpoint_then_download_it(models, model_files, settings):
    request_id = str(uuid.uuid4())
    messages = _upload(
        model_files / "config.py", model_files / "checkpoint.pth", request_id=request_id
    )
    model = await models.ImportTrainedModel(_stream(messages))
    assert model.training_run == "" and model.base_model == ""
    assert list(model.classes) == ["dump", "tire"] and model.facts.parameter_count > 1_000_000
    expected = hashlib.sha256((model_files / "checkpoint.pth").read_bytes()).hexdigest()
    assert _checkpoint(model).sha256 == expected

    # Repeating the request id returns the same model.
    again = await models.ImportTrainedModel(_stream(messages))
    assert again.name == model.name

    # An imported root passes the gate.
    published = await models.PublishTrainedModel(
        pb.PublishTrainedModelRequest(name=model.name, channel=f"imp-{uuid.uuid4().hex[:6]}")
    )
    assert published.publication.published

    stream = models.DownloadTrainedModel(pb.DownloadTrainedModelRequest(name=model.name))
    header: common_pb2.Artifact | None = None
    digest, size, chunks = hashlib.sha256(), 0, 0
    async for part in stream:
        if part.WhichOneof("part") == "artifact":
            assert header is None, "the artifact comes first, once"
            header = part.artifact
        else:
            assert header is not None
            digest.update(part.chunk)
            size += len(part.chunk)
            chunks += 1
    assert header is not None and header.sha256 == expected
    assert digest.hexdigest() == header.sha256 and size == header.size_bytes
    assert chunks == -(-size // (1024 * 1024))


@pytest.mark.timeout(180)
async def test_import_refuses_a_truncated_and_a_misfit_checkpoint_leaving_nothing(
    models, model_files, settings
):
    root = Path(settings.artifact_root)
    before_files = _leftovers(root)
    before = await models.ListTrainedModels(pb.ListTrainedModelsRequest(page_size=1000))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await models.ImportTrainedModel(
            _stream(_upload(model_files / "config.py", model_files / "truncated.pth"))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be loaded" in violations(caught.value)["checkpoint_chunk"]

    # Already in the store: referenced by URI instead of uploaded.
    metadata = pb.ImportTrainedModelRequest.Metadata(
        display_name="misfit",
        architecture="retinanet_r18_fpn",
        classes=["dump", "tire"],
        config_uri=(model_files / "config.py").as_uri(),
        checkpoint_uri="incoming/misfit.pth",
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await models.ImportTrainedModel(_stream([pb.ImportTrainedModelRequest(metadata=metadata)]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(caught.value)["metadata.checkpoint_uri"]
    assert "does not fit the config's model" in found and "classifier.weight" in found

    after = await models.ListTrainedModels(pb.ListTrainedModelsRequest(page_size=1000))
    assert len(after.trained_models) == len(before.trained_models)
    assert _leftovers(root) == before_files
    assert (model_files / "misfit.pth").exists(), "the caller's file is not consumed"


@pytest.mark.timeout(180)
async def test_import_never_executes_the_config(models, model_files, settings, tmp_path):
    root = Path(settings.artifact_root)
    before_files = _leftovers(root)
    marker = tmp_path / "marker"
    legit = (model_files / "config.py").read_text()
    hostile = {
        # Runs on load, as mmengine's Config.fromfile would run it.
        "writes a file": (
            f"{legit}\nopen({str(marker)!r}, 'w').write('ran')\n",
            "calls open()",
        ),
        "reads the environment": (
            f"import os\n{legit}\nleak = os.environ.get('RAVEN_DATABASE_URL')\n",
            "line 1 has an import",
        ),
        "hides a call in a value": (
            f"{legit}\nx = dict(a=__import__('os').system('touch {marker}'))\n",
            "calls __import__().system()",
        ),
        "inherits a file outside mmdet": (
            f"_base_ = [{str(model_files / 'config.py')!r}]\n{legit}",
            "not a config shipped with mmdet",
        ),
        "names an importable type": (
            "model = dict(type='subprocess.Popen', args=['touch', " + repr(str(marker)) + "])\n",
            "has type=",
        ),
    }
    for case, (text, problem) in hostile.items():
        config = tmp_path / "hostile.py"
        config.write_text(text)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await models.ImportTrainedModel(
                _stream(_upload(config, model_files / "checkpoint.pth"))
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        found = violations(caught.value)["config_chunk"]
        assert found.startswith("config: ") and problem in found, (case, found)
        assert str(tmp_path) not in found and len(found) < 300, case
    assert not marker.exists(), "the uploaded config was executed"
    assert _leftovers(root) == before_files


@pytest.mark.timeout(90)
async def test_an_oversized_chunk_leaves_nothing_in_uploads(models, settings):
    root = Path(settings.artifact_root)
    before_files = _leftovers(root)
    metadata = pb.ImportTrainedModelRequest.Metadata(
        display_name="huge", architecture="retinanet_r18_fpn", classes=["dump"]
    )
    oversized = pb.ImportTrainedModelRequest(checkpoint_chunk=b"\0" * (16 * 1024 * 1024 + 1))

    async def attempt(with_config: bool) -> grpc.StatusCode:
        messages = [pb.ImportTrainedModelRequest(metadata=metadata)]
        if with_config:
            messages.append(
                pb.ImportTrainedModelRequest(config_chunk=b"model = dict(type='RetinaNet')\n")
            )
        messages.append(oversized)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await models.ImportTrainedModel(_stream(messages), timeout=30)
        return caught.value.code()

    # The call ends while the handler is at any point of its first steps: several tries, at
    # once and one after another, land in different ones.
    codes = await asyncio.gather(*(attempt(i % 2 == 0) for i in range(6)))
    codes += [await attempt(i % 2 == 0) for i in range(4)]
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}

    async def cleaned() -> bool:
        return _leftovers(root) == before_files

    await eventually(cleaned, timeout=10)
