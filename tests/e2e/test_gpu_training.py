"""Training on CUDA through the whole system (RetinaNet R18, 128 px, 16 images): a run on
one GPU, with its device facts recorded and mixed precision on by default, and a run over
two GPUs under torch's distributed launcher. Skipped where CUDA has fewer devices
(tests/conftest.py)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from shared.proto.raven.training.v1 import trained_model_pb2, training_run_pb2
from shared.settings import Settings
from tests import training

TrainingRun = training_run_pb2.TrainingRun
Spec = training_run_pb2.TrainingSpec
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


# With the machine's GPUs: one job per GPU at once.
worker = training.worker_fixture("e2e-gpu-worker", RAVEN_WORKER_DEVICE="cuda")


@pytest.fixture(scope="module")
def dataset_uri(settings: Settings) -> str:
    return training.local_dataset(settings, "gpu", images=16, size=128)


async def train_to_the_end(runs, models, dataset_uri: str, **spec: object):
    """Creates a GPU run, follows it to SUCCEEDED; its events and its trained model."""
    run = await runs.CreateTrainingRun(
        training.run_request(
            "on cuda",
            dataset_uri,
            architecture="retinanet_r18_fpn",
            epochs=2,
            image_size=128,
            seed=7,
            device=Spec.GPU,
            **spec,
        )
    )
    events = await asyncio.wait_for(training.watch_to_the_end(runs, run.name), 300)
    states = training.payloads(events, "state_changed")
    assert states[-1].to_state == TrainingRun.SUCCEEDED, states[-1]

    name = await training.model_of(runs, run.name)
    model = await models.GetTrainedModel(trained_model_pb2.GetTrainedModelRequest(name=name))
    return events, model


def artifact_text(model: trained_model_pb2.TrainedModel, kind: str) -> str:
    uri = next(a.uri for a in model.artifacts if a.kind == kind)
    return Path(unquote(urlparse(uri).path)).read_text()


@pytest.mark.gpu
async def test_a_gpu_run_records_its_device_and_trains_with_mixed_precision(
    runs, models, worker, dataset_uri
):
    events, model = await train_to_the_end(runs, models, dataset_uri)

    # nvidia-smi's facts: the card's name and memory, and the one GPU the run was given.
    device = re.compile(r"^cuda:0 \(.+, \d+ GiB, 1 visible\)$")
    assert device.match(model.facts.device), model.facts.device
    running = next(
        s for s in training.payloads(events, "state_changed") if s.to_state == TrainingRun.RUNNING
    )
    assert model.facts.device in running.message
    # Mixed precision is on by default on CUDA: the config the run ran says so.
    assert "AmpOptimWrapper" in artifact_text(model, "config")


@pytest.mark.gpu(2)
async def test_a_run_over_two_gpus_trains_under_the_distributed_launcher(
    runs, models, worker, dataset_uri
):
    events, model = await train_to_the_end(runs, models, dataset_uri, gpu_count=2)

    assert re.match(r"^cuda:0 \(.+, 2 visible\)$", model.facts.device), model.facts.device
    # Rank 0 alone reports: each epoch is evaluated once, progress only moves forward.
    evaluations = [e.epoch for e in training.payloads(events, "evaluation")]
    assert evaluations == [1, 2]
    progress = [p.iteration for p in training.payloads(events, "progress")]
    assert progress == sorted(set(progress))
    config = artifact_text(model, "config")
    assert "launcher = 'pytorch'" in config
    # The run's batch of 4 is its total: 2 images on each GPU.
    assert re.search(r"^train_dataloader = dict\(\n(    .*\n)*?    batch_size=2,$", config, re.M)
    assert "AmpOptimWrapper" in config
    log = artifact_text(model, "log")
    assert "Distributed training: True" in log
