"""Datasets and artifacts in S3 (moto's server on loopback) through the whole system: a
worker configured with `RAVEN_ARTIFACT_STORE=s3://...` trains on a dataset it downloads
from the bucket (RetinaNet R18, 64 px, 8 images, 1 epoch on CPU), stores the model there,
and TrainedModelService streams it back."""

from __future__ import annotations

import asyncio
import hashlib

import nats
import pytest

from shared.names import TRAINING_RUNS, parse_name
from shared.proto.raven.training.v1 import trained_model_pb2, training_run_pb2
from shared.settings import Settings
from tests.s3 import S3Server
from tests.support import start_worker_process, stop_worker_process, worker_env
from tests.training import model_of, payloads, run_request, watch_to_the_end
from trainer_worker.synthetic import make_dataset

TrainingRun = training_run_pb2.TrainingRun
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

STORE_PREFIX = "e2e-artifacts"


@pytest.fixture(scope="module")
def s3_dataset(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A synthetic dataset uploaded to the bucket; the local copy is deleted."""
    folder = tmp_path_factory.mktemp("s3-dataset")
    make_dataset(folder, images=8, size=64, seed=2)
    for path in sorted(folder.rglob("*.*")):
        s3.put(f"e2e-data/{path.relative_to(folder).as_posix()}", path.read_bytes())
        path.unlink()
    return s3.uri("e2e-data/annotations.json")


@pytest.fixture(scope="module")
async def s3_worker(settings: Settings, nc: nats.NATS, subjects, s3: S3Server, tmp_path_factory):
    """`python -m trainer_worker` whose new artifacts go to the bucket."""
    await nc.jetstream().purge_stream(subjects.jobs_stream)
    work = tmp_path_factory.mktemp("s3-worker")
    env = worker_env(
        settings,
        "e2e-s3-worker",
        # Its own scratch folder: nothing it records may point there.
        RAVEN_ARTIFACT_ROOT=str(work / "artifacts"),
        RAVEN_ARTIFACT_STORE=s3.uri(STORE_PREFIX),
        RAVEN_S3_ENDPOINT_URL=s3.endpoint,
    )
    log_path = work / "worker.log"
    process = await start_worker_process(env, log_path)
    yield process
    await stop_worker_process(process, log_path)


async def download(models, name: str) -> tuple[str, bytes]:
    header, data = "", b""
    stream = models.DownloadTrainedModel(trained_model_pb2.DownloadTrainedModelRequest(name=name))
    async for part in stream:
        if part.WhichOneof("part") == "artifact":
            header = part.artifact.sha256
        else:
            data += part.chunk
    return header, data


async def test_train_on_an_s3_dataset_and_store_the_model_in_s3(
    runs, models, s3_worker, s3_dataset, s3: S3Server
):
    run = await runs.CreateTrainingRun(
        run_request(
            "s3", s3_dataset, architecture="retinanet_r18_fpn", epochs=1, image_size=64, seed=3
        )
    )
    events = await asyncio.wait_for(watch_to_the_end(runs, run.name), 180)
    finished = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
    assert finished.state == TrainingRun.SUCCEEDED, finished.failure
    (dataset,) = payloads(events, "dataset_prepared")
    assert dataset.image_count == 8 and list(dataset.classes) == ["dump", "tire"]
    notices = [n.code for n in payloads(events, "notice")]
    assert "checkpoint_not_stored" not in notices, "each epoch's checkpoint was uploaded"

    model = await models.GetTrainedModel(
        trained_model_pb2.GetTrainedModelRequest(name=await model_of(runs, run.name))
    )

    run_id = parse_name(run.name, TRAINING_RUNS)
    model_prefix = f"{STORE_PREFIX}/models/{run_id}/"
    kinds = {a.kind for a in model.artifacts}
    assert kinds >= {"checkpoint", "config", "metrics", "log", "report", "plot"}
    assert "report_not_rendered" not in notices
    for artifact in model.artifacts:
        assert artifact.uri.startswith(s3.uri(model_prefix)), artifact.uri
        key = artifact.uri.removeprefix(f"s3://{s3.bucket}/")
        assert s3.sha256(key) == artifact.sha256, f"{key} holds the recorded bytes"
        assert len(s3.get(key)) == artifact.size_bytes
    assert s3.keys(f"{STORE_PREFIX}/runs/{run_id}/") == [], "stale epoch checkpoints go"

    sha256, data = await download(models, model.name)
    checkpoint = next(a for a in model.artifacts if a.kind == "checkpoint")
    assert sha256 == checkpoint.sha256 == hashlib.sha256(data).hexdigest()
    assert len(data) == checkpoint.size_bytes
