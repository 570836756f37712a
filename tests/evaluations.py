"""Models and their evaluations for the tests of comparison, the publication gate and
downloads.

Models come from runs driven to SUCCEEDED by WorkerEvents, as a trainer worker sends
them; their files are written under the session's artifact root. Evaluations come
through the public API the same way (`Fleet.evaluated`), or, where a test needs
findings no worker would send together (other image sets of one dataset, a failed job
with findings, exact creation times), recorded as a succeeded evaluation job records
them (`Fleet.evaluation`): a `training_runs` row of kind "evaluation" and its
`model_evaluations` row.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.schema import model_evaluations, training_runs
from shared.messaging import Subjects
from shared.proto.raven.training.v1 import (
    common_pb2,
    trained_model_pb2,
    training_run_pb2,
    worker_pb2,
)
from shared.proto_json import to_dict
from tests.support import WorkerDriver, create_request, eventually

pb = trained_model_pb2
# Evaluations seeded by one test get increasing times from here: "newest" is exact.
_BASE = datetime.now(UTC) - timedelta(days=1)
_counter = iter(range(1, 1_000_000))


@dataclass(frozen=True, slots=True)
class Images:
    dataset_fingerprint: str
    split: str
    images_fingerprint: str


def images(split: str = "val") -> Images:
    """A set of images no other test uses."""
    tag = uuid.uuid4().hex[:8]
    return Images(f"fp-{tag}", split, f"img-{tag}-{split}")


def artifact(
    root: Path, relative: str, data: bytes, *, kind: str, name: str = ""
) -> common_pb2.Artifact:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return common_pb2.Artifact(
        kind=kind,
        uri=path.as_uri(),
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        name=name,
    )


class Fleet:
    """Registers models through the real run flow and records their evaluations."""

    def __init__(
        self, runs, models, js, subjects: Subjects, root: Path, dataset_uri: str, engine
    ) -> None:
        self.runs, self.models, self.js, self.subjects = runs, models, js, subjects
        self.root = root
        self.dataset_uri = dataset_uri
        self.engine: AsyncEngine = engine

    async def model(
        self, *, extra: Sequence[common_pb2.Artifact] = (), display_name: str = "tiny run"
    ) -> tuple[pb.TrainedModel, str]:
        """A registered model and the name of the run that made it."""
        request = create_request(self.dataset_uri)
        request.training_run.display_name = display_name
        run = await self.runs.CreateTrainingRun(request)
        worker = WorkerDriver(self.js, self.subjects, run)
        await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
        await worker.send(
            dataset_prepared=common_pb2.DatasetSummary(
                fingerprint=f"fp-{run.name[-6:]}", image_count=16, classes=["dump", "tire"]
            )
        )
        await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
        run_id = run.name.split("/")[1]
        folder = f"models/{run_id}"
        succeeded = worker_pb2.WorkerEvent.Succeeded(
            artifacts=[
                artifact(
                    self.root,
                    f"{folder}/config.py",
                    b"model = dict(type='RetinaNet')\n",
                    kind="config",
                    name="config.py",
                ),
                artifact(
                    self.root,
                    f"{folder}/checkpoint.pth",
                    uuid.uuid4().bytes * 70_000,
                    kind="checkpoint",
                    name="epoch_2.pth",
                ),
                *extra,
            ],
            facts=common_pb2.TrainingFacts(epochs_trained=2, best_epoch=2, device="cpu"),
            evaluation=common_pb2.Evaluation(
                epoch=2, split="val", metrics={"coco/bbox_mAP": 0.25}, image_count=4
            ),
        )
        await worker.send(succeeded=succeeded)
        model = await eventually(lambda: self._model_of(run.name), timeout=15)
        return model, run.name

    async def _model_of(self, run_name: str) -> pb.TrainedModel | None:
        found = await self.models.ListTrainedModels(
            pb.ListTrainedModelsRequest(training_run=run_name)
        )
        return found.trained_models[0] if found.trained_models else None

    async def evaluated(
        self,
        model: pb.TrainedModel,
        on: Images,
        *,
        metrics: Mapping[str, float],
        artifacts: Sequence[common_pb2.Artifact] = (),
    ) -> pb.ModelEvaluation:
        """An evaluation through the public API (EvaluateTrainedModel on the whole
        dataset: `on.split` is "all"), its job driven to SUCCEEDED by WorkerEvents as a
        worker sends them, its findings those of `on`."""
        assert on.split == "all"
        started = await self.models.EvaluateTrainedModel(
            pb.EvaluateTrainedModelRequest(
                trained_model=model.name,
                dataset_uri=self.dataset_uri,
                request_id=str(uuid.uuid4()),
            )
        )
        job = await self.runs.GetTrainingRun(
            training_run_pb2.GetTrainingRunRequest(name=started.job)
        )
        worker = WorkerDriver(self.js, self.subjects, job)
        await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
        await worker.send(
            dataset_prepared=common_pb2.DatasetSummary(
                fingerprint=on.dataset_fingerprint, image_count=6, classes=["dump", "tire"]
            )
        )
        await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
        await worker.send(
            succeeded=worker_pb2.WorkerEvent.Succeeded(
                artifacts=list(artifacts),
                evaluation=common_pb2.Evaluation(split="all", metrics=dict(metrics), image_count=6),
                review=common_pb2.DetectionReview(
                    score_threshold=0.5,
                    iou_threshold=0.5,
                    images_fingerprint=on.images_fingerprint,
                ),
            )
        )

        async def done() -> pb.ModelEvaluation | None:
            found = await self.models.GetModelEvaluation(
                pb.GetModelEvaluationRequest(name=started.name)
            )
            return found if found.state == training_run_pb2.TrainingRun.SUCCEEDED else None

        return await eventually(done, timeout=15)

    async def evaluation(
        self,
        model: pb.TrainedModel,
        on: Images,
        *,
        metrics: Mapping[str, float] | None = None,
        per_class_ap: Mapping[str, float] | None = None,
        state: str = "SUCCEEDED",
        artifacts: Sequence[common_pb2.Artifact] = (),
        image_count: int = 6,
    ) -> str:
        """Records an evaluation of `model` (newer than any recorded before), its job in
        `state`, and returns its name."""
        evaluation_id = uuid.uuid4()
        model_id = uuid.UUID(model.name.split("/")[1])
        when = _BASE + timedelta(seconds=next(_counter))
        evaluation = common_pb2.Evaluation(
            split=on.split,
            metrics=dict(metrics or {}),
            per_class_ap=dict(per_class_ap or {}),
            image_count=image_count,
        )
        stored = [to_dict(a) for a in artifacts]
        # The findings are written whatever the state: only the job's state may keep an
        # evaluation out of a comparison.
        async with self.engine.begin() as connection:
            await connection.execute(
                insert(training_runs).values(
                    id=evaluation_id,
                    display_name=f"evaluation of {model.display_name}",
                    state=state,
                    spec={"dataset_uri": self.dataset_uri, "architecture": model.architecture},
                    architecture=model.architecture,
                    dataset_uri=self.dataset_uri,
                    creator=model.creator,
                    kind="evaluation",
                    artifacts=stored,
                    create_time=when,
                    update_time=when,
                )
            )
            await connection.execute(
                insert(model_evaluations).values(
                    id=evaluation_id,
                    trained_model_id=model_id,
                    dataset_uri=self.dataset_uri,
                    split=on.split,
                    score_threshold=0.5,
                    iou_threshold=0.5,
                    samples=3,
                    creator=model.creator,
                    create_time=when,
                    dataset_fingerprint=on.dataset_fingerprint,
                    images_fingerprint=on.images_fingerprint,
                    image_count=image_count,
                    evaluation=to_dict(evaluation),
                    artifacts=stored,
                )
            )
        return f"{model.name}/evaluations/{evaluation_id}"
