"""Job claims: the request-reply that fences who trains which attempt of a run."""

from __future__ import annotations

import pytest

from shared.proto.raven.training.v1 import common_pb2, training_run_pb2, worker_pb2
from tests.support import WorkerDriver, create_request, eventually

TrainingRun = training_run_pb2.TrainingRun
pytestmark = pytest.mark.timeout(60)


async def claim(nc, subjects, run: TrainingRun, *, attempt: int, worker: str):
    request = worker_pb2.ClaimJobRequest(
        training_run=run.name, attempt=attempt, worker_id=worker, delivery=1
    )
    reply = await nc.request(subjects.claims, request.SerializeToString(), timeout=5)
    return worker_pb2.ClaimJobResponse.FromString(reply.data)


async def state_of(runs, run: TrainingRun) -> TrainingRun:
    return await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))


async def test_a_queued_job_is_granted_once_per_attempt(runs, nc, subjects, dataset_uri):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    first = await claim(nc, subjects, run, attempt=1, worker="w1")
    assert first.granted and first.attempt == 1
    assert (await state_of(runs, run)).state == TrainingRun.PREPARING

    # The job comes back (its holder stopped renewing it): the claimant takes over
    # as attempt 2, and attempt 1 is fenced off.
    second = await claim(nc, subjects, run, attempt=1, worker="w2")
    assert second.granted and second.attempt == 2
    current = await state_of(runs, run)
    assert current.attempt == 2 and current.state == TrainingRun.PREPARING
    stale = await claim(nc, subjects, run, attempt=1, worker="w3")
    assert not stale.granted and stale.refusal == "superseded"


def checkpoint_saved(epoch: int) -> worker_pb2.WorkerEvent.CheckpointSaved:
    return worker_pb2.WorkerEvent.CheckpointSaved(
        epoch=epoch,
        iteration=epoch * 4,
        checkpoint=common_pb2.Artifact(
            kind="checkpoint", uri=f"file:///ckpt/epoch_{epoch}.pth", sha256=f"{epoch}" * 64
        ),
    )


async def handled(runs, worker: WorkerDriver, run: TrainingRun) -> None:
    """Waits until the service has handled every event the worker sent so far (events of
    a run are handled in order: a marker sent last shows up last)."""
    await worker.send(notice=training_run_pb2.TrainingRunEvent.Notice(code="sync", message=""))

    async def synced() -> bool:
        page = await runs.ListTrainingRunEvents(
            training_run_pb2.ListTrainingRunEventsRequest(name=run.name)
        )
        return any(e.notice.code == "sync" for e in page.events)

    await eventually(synced)


async def test_a_taken_over_run_resumes_from_its_newest_recorded_checkpoint(
    runs, nc, js, subjects, dataset_uri
):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    assert (await claim(nc, subjects, run, attempt=1, worker="w1")).granted
    worker = WorkerDriver(js, subjects, run)
    for epoch in (1, 2):
        await worker.send(checkpoint_saved=checkpoint_saved(epoch))
    await handled(runs, worker, run)
    takeover = await claim(nc, subjects, run, attempt=1, worker="w2")
    assert takeover.granted and takeover.attempt == 2
    assert takeover.resume_epoch == 2
    assert takeover.resume_from.uri == "file:///ckpt/epoch_2.pth"
    assert takeover.resume_from.sha256 == "2" * 64


async def test_a_taken_over_run_also_gets_the_best_epochs_checkpoint(
    runs, nc, js, subjects, dataset_uri
):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    assert (await claim(nc, subjects, run, attempt=1, worker="w1")).granted
    worker = WorkerDriver(js, subjects, run)
    for epoch, mAP in ((1, 0.3), (2, 0.6), (3, 0.4)):
        await worker.send(checkpoint_saved=checkpoint_saved(epoch))
        await worker.send(
            evaluation=common_pb2.Evaluation(
                epoch=epoch, split="val", metrics={"coco/bbox_mAP": mAP}
            )
        )
    await handled(runs, worker, run)
    takeover = await claim(nc, subjects, run, attempt=1, worker="w2")
    assert takeover.granted and takeover.attempt == 2
    assert takeover.resume_epoch == 3
    assert takeover.resume_from.uri == "file:///ckpt/epoch_3.pth"
    # Epoch 2 had the highest mAP: the resumed attempt keeps it as a candidate.
    assert takeover.best_epoch == 2
    assert takeover.best_checkpoint.uri == "file:///ckpt/epoch_2.pth"
    assert takeover.best_checkpoint.sha256 == "2" * 64


async def test_cancelled_and_exhausted_runs_are_refused(runs, nc, subjects, dataset_uri):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    await runs.CancelTrainingRun(training_run_pb2.CancelTrainingRunRequest(name=run.name))
    refused = await claim(nc, subjects, run, attempt=1, worker="w1")
    assert not refused.granted and refused.refusal == "cancelled"

    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    attempt = 1
    for worker in ("w1", "w2", "w3"):  # max_attempts is 3
        granted = await claim(nc, subjects, run, attempt=attempt, worker=worker)
        assert granted.granted
        attempt = granted.attempt
    exhausted = await claim(nc, subjects, run, attempt=attempt, worker="w4")
    assert not exhausted.granted and exhausted.refusal == "attempts_exhausted"
    failed = await state_of(runs, run)
    assert failed.state == TrainingRun.FAILED and failed.failure.reason == "worker_lost"
