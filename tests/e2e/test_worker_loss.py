"""Losing a worker mid-run: killed with SIGKILL, or stopped with SIGTERM. Another
`python -m trainer_worker` process resumes the run from the last checkpoint, so each
epoch is trained once and the run ends with one TrainedModel (RetinaNet R18, 128 px,
16 images, 3 epochs on CPU)."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from shared.proto.raven.training.v1 import trained_model_pb2, training_run_pb2, worker_pb2
from shared.settings import Settings
from tests.support import eventually, start_worker_process, stop_worker_process, worker_env
from tests.training import local_dataset, payloads, run_request

TrainingRun = training_run_pb2.TrainingRun
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(360)]

# Short, so that the job of a killed worker comes back within seconds.
ACK_WAIT_S = 6
EPOCHS = 3


@pytest.fixture(scope="module")
def dataset_uri(settings: Settings) -> str:
    return local_dataset(settings, "loss", images=16, size=128)


@pytest.fixture
async def start_worker(
    settings: Settings, nc: nats.NATS, subjects, tmp_path: Path
) -> AsyncIterator:
    """Starts `python -m trainer_worker` processes; stops the survivors at the end."""
    await nc.jetstream().purge_stream(subjects.jobs_stream)
    started: list[tuple[asyncio.subprocess.Process, Path]] = []

    async def start(worker_id: str) -> asyncio.subprocess.Process:
        env = worker_env(settings, worker_id, RAVEN_JOB_ACK_WAIT_S=str(ACK_WAIT_S))
        log_path = tmp_path / f"{worker_id}.log"
        process = await start_worker_process(env, log_path)
        started.append((process, log_path))
        return process

    yield start
    for process, log_path in started:
        await stop_worker_process(process, log_path, tail=3000)


def request(name: str, dataset_uri: str) -> training_run_pb2.CreateTrainingRunRequest:
    return run_request(
        name, dataset_uri, architecture="retinanet_r18_fpn", epochs=EPOCHS, image_size=128, seed=5
    )


async def events_until_evaluation(runs, name: str, epoch: int, events: list) -> None:
    """Collects the run's events until `epoch` was validated."""
    after = events[-1].sequence if events else 0
    stream = runs.WatchTrainingRun(
        training_run_pb2.WatchTrainingRunRequest(name=name, after_sequence=after)
    )
    async for event in stream:
        events.append(event)
        if event.WhichOneof("payload") == "evaluation" and event.evaluation.epoch == epoch:
            stream.cancel()
            return


class WorkerEvents:
    """The worker's reports of one run, as they travel on the worker events stream."""

    def __init__(self) -> None:
        self.seen: list[worker_pb2.WorkerEvent] = []
        self._changed = asyncio.Event()

    async def on_message(self, msg) -> None:
        self.seen.append(worker_pb2.WorkerEvent.FromString(msg.data))
        self._changed.set()

    def kinds(self) -> list[tuple[str, int]]:
        """(payload, epoch) of each checkpoint and validation, in the order reported."""
        found = []
        for event in self.seen:
            kind = event.WhichOneof("payload")
            if kind == "checkpoint_saved":
                found.append((kind, event.checkpoint_saved.epoch))
            elif kind == "evaluation" and event.evaluation.split != "test":
                found.append((kind, event.evaluation.epoch))
        return found

    async def until_checkpoint(self, epoch: int) -> None:
        """Returns once the checkpoint of `epoch` was reported: what a next attempt
        resumes from (the worker reports it after the epoch's validation)."""
        while ("checkpoint_saved", epoch) not in self.kinds():
            self._changed.clear()
            await self._changed.wait()


@pytest.fixture
async def worker_events(nc: nats.NATS, subjects) -> AsyncIterator:
    subscriptions = []

    async def follow(run_name: str) -> WorkerEvents:
        events = WorkerEvents()
        subject = subjects.worker_event(run_name.split("/")[1])
        subscriptions.append(await nc.subscribe(subject, cb=events.on_message))
        return events

    yield follow
    for subscription in subscriptions:
        await subscription.unsubscribe()


async def events_to_the_end(runs, name: str, events: list) -> None:
    stream = runs.WatchTrainingRun(
        training_run_pb2.WatchTrainingRunRequest(name=name, after_sequence=events[-1].sequence)
    )
    events += [event async for event in stream]


async def test_a_run_survives_a_killed_and_a_stopped_worker(
    runs, models, start_worker, worker_events, dataset_uri
):
    first = await start_worker("killed-worker")
    run = await runs.CreateTrainingRun(request("twice resumed", dataset_uri))
    reports = await worker_events(run.name)
    events: list = []
    await asyncio.wait_for(events_until_evaluation(runs, run.name, 1, events), 120)
    await asyncio.wait_for(reports.until_checkpoint(1), 60)

    # SIGKILL: no goodbye; the job comes back after AckWait and the claim makes it
    # attempt 2, resuming from epoch 1's checkpoint.
    first.kill()
    await first.wait()
    second = await start_worker("stopped-worker")
    await asyncio.wait_for(events_until_evaluation(runs, run.name, 2, events), 120)
    await asyncio.wait_for(reports.until_checkpoint(2), 60)

    # SIGTERM: the worker stops its training, gives the job back and exits; the service
    # queues attempt 3 at once, without waiting for AckWait or a lost-worker timeout.
    second.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(second.wait(), 60) == 0, "a clean, bounded shutdown"
    await start_worker("last-worker")
    await asyncio.wait_for(events_to_the_end(runs, run.name, events), 180)

    states = [s.to_state for s in payloads(events, "state_changed")]
    assert states[-1] == TrainingRun.SUCCEEDED, states
    assert [e.epoch for e in payloads(events, "evaluation")] == [1, 2, 3], (
        "each epoch trained and validated once, across three attempts"
    )
    reasons = [s.reason for s in payloads(events, "state_changed")]
    assert "worker_released" in reasons, reasons
    notices = [n.code for n in payloads(events, "notice")]
    assert notices.count("resumed") == 2 and "worker_stopping" in notices

    finished = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
    assert finished.attempt == 3
    assert finished.facts.epochs_trained == EPOCHS
    metrics = await runs.GetTrainingRunMetrics(
        training_run_pb2.GetTrainingRunMetricsRequest(name=run.name)
    )
    assert [e.epoch for e in metrics.epochs] == [1, 2, 3]
    assert all("loss" in e.train for e in metrics.epochs), "earlier attempts' means survive"

    async def registered() -> list:
        page = await models.ListTrainedModels(
            trained_model_pb2.ListTrainedModelsRequest(training_run=run.name)
        )
        return list(page.trained_models)

    (model,) = await eventually(registered, timeout=15)
    log = next(a for a in model.artifacts if a.kind == "log")
    assert log.size_bytes > 0 and len(log.sha256) == 64
    text = await asyncio.to_thread(Path(log.uri.removeprefix("file://")).read_text)
    # The last attempt's log: it trained epoch 3 only.
    assert re.search(r"Epoch\(train\)\s*\[3\]", text), text[-2000:]
    assert not re.search(r"Epoch\(train\)\s*\[[12]\]", text)
    await asyncio.sleep(1)
    assert len(await registered()) == 1, "exactly one TrainedModel"


async def test_a_worker_lost_as_its_checkpoint_is_reported_leaves_no_epoch_unvalidated(
    runs, start_worker, worker_events, dataset_uri
):
    """SIGKILL the moment epoch 1's checkpoint is reported: the next attempt resumes after
    epoch 1, so epoch 1 must have been validated by then."""
    first = await start_worker("lost-at-checkpoint")
    created = request("lost at a checkpoint", dataset_uri)
    created.training_run.spec.epochs = 2
    run = await runs.CreateTrainingRun(created)
    reports = await worker_events(run.name)
    await asyncio.wait_for(reports.until_checkpoint(1), 180)
    first.kill()
    await first.wait()
    # The checkpoint is reported after the validation it follows, never before.
    assert reports.kinds()[:2] == [("evaluation", 1), ("checkpoint_saved", 1)], reports.kinds()

    await start_worker("after-the-loss")
    events: list = []
    await asyncio.wait_for(events_until_evaluation(runs, run.name, 2, events), 180)
    await asyncio.wait_for(events_to_the_end(runs, run.name, events), 120)

    states = [s.to_state for s in payloads(events, "state_changed")]
    assert states[-1] == TrainingRun.SUCCEEDED, states
    finished = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
    assert finished.attempt == 2
    metrics = await runs.GetTrainingRunMetrics(
        training_run_pb2.GetTrainingRunMetricsRequest(name=run.name)
    )
    # No hole: every epoch has its losses and was validated once (an early epoch's
    # validation may find no box yet: its metrics can be empty, its evaluation is there).
    assert [e.epoch for e in metrics.epochs] == [1, 2]
    assert all("loss" in e.train for e in metrics.epochs), metrics
    assert [e.epoch for e in payloads(events, "evaluation")] == [1, 2]
