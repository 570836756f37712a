"""A run's metrics through the API while a real worker trains it and after it ended: the
same keys, one best epoch, and the worker's data loading on the run's facts."""

from __future__ import annotations

import asyncio

import nats
import pytest

from shared.proto.raven.training.v1 import training_run_pb2
from shared.settings import Settings
from tests.support import create_request, start_worker_process, stop_worker_process, worker_env
from tests.training import local_dataset

TrainingRun = training_run_pb2.TrainingRun
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
TERMINAL = {TrainingRun.SUCCEEDED, TrainingRun.FAILED, TrainingRun.CANCELLED}


@pytest.fixture(scope="module")
async def worker(settings: Settings, nc: nats.NATS, subjects, tmp_path_factory):
    # Jobs queued by other tests name datasets that exist only for the service's checks.
    await nc.jetstream().purge_stream(subjects.jobs_stream)
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    env = worker_env(settings, "metrics-worker", RAVEN_WORKER_DATALOADER_WORKERS="1")
    process = await start_worker_process(env, log_path)
    yield process
    await stop_worker_process(process, log_path)


def keys(metrics: training_run_pb2.TrainingRunMetrics) -> dict[int, tuple[set[str], set[str]]]:
    return {e.epoch: (set(e.train), set(e.val)) for e in metrics.epochs}


async def test_a_runs_metrics_keep_their_keys_and_agree_on_the_best_epoch(
    runs, worker, settings: Settings
):
    run = await runs.CreateTrainingRun(
        create_request(
            local_dataset(settings, "metrics", images=16, size=128),
            epochs=2,
            image_size=128,
            seed=3,
            device=training_run_pb2.TrainingSpec.CPU,
        )
    )
    name = training_run_pb2.GetTrainingRunRequest(name=run.name)
    metrics_of = training_run_pb2.GetTrainingRunMetricsRequest(name=run.name)
    # Each epoch's keys as seen while the run trained: once validated, and before.
    live: dict[int, tuple[set[str], set[str]]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 240
    while (current := await runs.GetTrainingRun(name)).state not in TERMINAL:
        assert loop.time() < deadline, "the run did not finish"
        if current.state == TrainingRun.RUNNING:
            for epoch, (train, val) in keys(await runs.GetTrainingRunMetrics(metrics_of)).items():
                if train:
                    live[epoch] = (train, val or live.get(epoch, (set(), set()))[1])
        await asyncio.sleep(0.2)

    assert current.state == TrainingRun.SUCCEEDED, current.failure
    final = await runs.GetTrainingRunMetrics(metrics_of)
    finished = keys(final)
    assert live, "the metrics were read while the run trained"
    for epoch, (train, val) in live.items():
        assert {"loss", "loss_cls", "loss_bbox", "lr"} <= train
        assert train == finished[epoch][0], f"epoch {epoch}'s train keys changed at the end"
        if val:
            assert val == finished[epoch][1], f"epoch {epoch}'s val keys changed at the end"
    assert all("lr" in train for train, _ in finished.values())

    assert final.best_epoch == current.facts.best_epoch == current.best_evaluation.epoch
    assert final.best_epoch in (1, 2)
    assert current.best_evaluation.image_count == current.dataset.val_image_count > 0
    loading = current.facts.data_loading
    # RAVEN_WORKER_DATALOADER_WORKERS=1; on CPU nothing is pinned.
    assert (loading.workers, loading.persistent_workers, loading.pin_memory) == (1, True, False)
