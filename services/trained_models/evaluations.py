"""Model evaluations: EvaluateTrainedModel, and reading and cancelling them.

An evaluation is run by a job of kind EVALUATION on the training queue (a TrainingRun,
services.training_runs), so that it has the claims, fencing, attempts, cancellation,
recovery and events of training without a second implementation of them. Its job row,
its model_evaluations row and its job message are written in one transaction, by the
training runs' unit of work.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass
from typing import Any

import structlog

from services.training_runs.domain import EvaluationRecord, RunState, TrainingRun
from services.training_runs.domain.evaluation import (
    DEFAULT_IOU_THRESHOLD,
    DEFAULT_SAMPLES,
    DEFAULT_SCORE_THRESHOLD,
    MAX_SAMPLES,
    SPLITS,
)
from services.training_runs.handlers.common import Clock, parse_request_id, utcnow
from services.training_runs.handlers.creation import check_dataset_exists, missing_artifacts
from services.training_runs.messages import job_message
from services.training_runs.repository import BaseModel, EvaluationFilter
from services.training_runs.spec import SpecRequest, validate_spec
from services.training_runs.unit_of_work import UnitOfWork
from shared import catalog
from shared.errors import AlreadyExists, FailedPrecondition, NotFound, Violations
from shared.names import TRAINING_RUNS, parse_name
from shared.pagination import Cursor
from shared.storage import Storage

log = structlog.get_logger(__name__)

# What an evaluation job takes from the run whose split it evaluates: the split's
# parameters, and the image size and batch size of its inference.
_FROM_SPLIT_RUN = ("seed", "val_fraction", "test_fraction", "image_size", "batch_size")
# The split an evaluation of a run's split takes when none is named.
DEFAULT_SPLIT_OF_RUN = "test"
DEFAULT_SPLIT = "all"


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateModel:
    """EvaluateTrainedModelRequest, in domain terms (None: unset)."""

    trained_model_id: uuid.UUID
    dataset_uri: str
    image_root: str
    split_of: str
    split: str
    score_threshold: float | None
    iou_threshold: float | None
    samples: int | None
    device: str
    request_id: str
    creator: str
    # Fingerprint of the request body: the same request_id must come with the same body.
    request_hash: str
    # Set for a caller that may see only its own models (or runs): the model (the run
    # named in split_of) must be one of them.
    model_owner: str | None = None
    run_owner: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Thresholds:
    score: float
    iou: float
    samples: int


def _thresholds(command: EvaluateModel, violations: Violations) -> _Thresholds:
    score = DEFAULT_SCORE_THRESHOLD if command.score_threshold is None else command.score_threshold
    iou = DEFAULT_IOU_THRESHOLD if command.iou_threshold is None else command.iou_threshold
    samples = DEFAULT_SAMPLES if command.samples is None else command.samples
    violations.check(
        math.isfinite(score) and 0 <= score <= 1,
        "score_threshold",
        f"must be between 0 and 1, got {score}",
    )
    violations.check(
        math.isfinite(iou) and 0 < iou <= 1,
        "iou_threshold",
        f"must be greater than 0 and at most 1, got {iou}",
    )
    violations.check(
        0 <= samples <= MAX_SAMPLES,
        "samples",
        f"must be between 0 and {MAX_SAMPLES}, got {samples}",
    )
    return _Thresholds(score=score, iou=iou, samples=samples)


async def evaluate_model(
    uow: UnitOfWork, command: EvaluateModel, *, storage: Storage, clock: Clock = utcnow
) -> TrainingRun:
    """Starts an evaluation (its job, QUEUED), once per request_id; returns the job."""
    violations = Violations()
    request_id = parse_request_id(command.request_id, violations)
    split_of_id = (
        parse_name(command.split_of, TRAINING_RUNS, field="split_of") if command.split_of else None
    )
    split = command.split or (DEFAULT_SPLIT_OF_RUN if split_of_id else DEFAULT_SPLIT)
    if split not in SPLITS:
        violations.add("split", "one of: " + ", ".join(repr(s) for s in SPLITS))
    if not command.dataset_uri and split_of_id is None:
        violations.add("dataset_uri", "required unless split_of names the run whose dataset it is")
    thresholds = _thresholds(command, violations)
    # Outside the transaction: an object store may take a while to answer.
    if command.dataset_uri:
        await check_dataset_exists(command.dataset_uri, storage, violations, field="dataset_uri")
    violations.raise_if_any()
    async with uow:
        if request_id is not None:
            existing = await _repeated(uow, command, request_id)
            if existing is not None:
                return existing
        model = await uow.runs.base_model(command.trained_model_id, lock=True)
        if model is None or command.model_owner not in (None, model.creator):
            raise NotFound(f"trained model {command.trained_model_id} does not exist")
        split_run = await _split_run(uow, split_of_id, split, command.run_owner)
        dataset_uri = command.dataset_uri or (split_run.dataset_uri if split_run else "")
        image_root = command.image_root or (
            str(split_run.spec.get("image_root", ""))
            if split_run and not command.dataset_uri
            else ""
        )
        missing = await asyncio.to_thread(missing_artifacts, model, storage)
        if missing:
            raise FailedPrecondition(
                f"trained model {model.id} has lost its {', '.join(missing)}; "
                "it cannot be evaluated"
            )
        inference = split_run or await _model_run(uow, model)
        inherited: dict[str, Any] = (
            {k: inference.spec.get(k) for k in _FROM_SPLIT_RUN} if inference else {}
        )
        spec = validate_spec(
            SpecRequest(
                dataset_uri=dataset_uri,
                image_root=image_root,
                architecture=model.architecture,
                device=command.device,
                **inherited,
            ),
            violations,
            base_architecture=model.architecture,
            prefix="",
        )
        violations.raise_if_any()
        assert spec is not None
        now = clock()
        job = TrainingRun.create(
            display_name=_job_name(model),
            labels={},
            spec=spec,
            base_model_id=None,
            creator=command.creator,
            request_id=request_id,
            request_hash=command.request_hash,
            now=now,
            evaluation=EvaluationRecord(
                trained_model_id=model.id,
                dataset_uri=dataset_uri,
                image_root=image_root,
                split=split,
                split_of_id=split_of_id,
                score_threshold=thresholds.score,
                iou_threshold=thresholds.iou,
                samples=thresholds.samples,
                creator=command.creator,
                create_time=now,
            ),
        )
        uow.runs.add(job)
        uow.publish(job_message(job, model, uow.subjects))
        try:
            await uow.commit()
        except AlreadyExists:
            # The same request raced this one and committed first.
            if request_id is None:
                raise
            existing = await _repeated(uow, command, request_id)
            if existing is None:
                raise
            return existing
    log.info("model evaluation queued", evaluation_id=str(job.id), model_id=str(model.id))
    return job


def _job_name(model: BaseModel) -> str:
    name = f"evaluation of {model.display_name or model.id}"
    return name[: catalog.DISPLAY_NAME_MAX]


async def _repeated(
    uow: UnitOfWork, command: EvaluateModel, request_id: uuid.UUID
) -> TrainingRun | None:
    """The evaluation an earlier request with this request_id started, if the bodies match."""
    existing = await uow.runs.get_by_request(command.creator, request_id)
    if existing is None:
        return None
    if existing.request_hash != command.request_hash:
        raise AlreadyExists(f"request_id {request_id} was used for another request")
    if existing.evaluation is None:
        raise FailedPrecondition(
            f"the evaluation request_id {request_id} started was deleted with its model"
        )
    return existing


async def _split_run(
    uow: UnitOfWork, run_id: uuid.UUID | None, split: str, owner: str | None
) -> TrainingRun | None:
    """The training run whose split is meant, which must have one of that name."""
    if run_id is None:
        return None
    run = await uow.runs.get(run_id)
    if run is None or owner not in (None, run.creator):
        raise NotFound(f"training run {run_id} does not exist")
    if run.is_evaluation:
        raise FailedPrecondition(
            f"training run {run_id} is the job of a model evaluation; split_of names a training run"
        )
    summary = run.dataset
    counts = {
        "train": summary.train_image_count if summary else None,
        "val": summary.val_image_count if summary else None,
        "test": summary.test_image_count if summary else None,
    }
    if counts.get(split) == 0:
        raise FailedPrecondition(
            f"training run {run_id} has no {split} split (no image of its dataset went there); "
            "choose another split"
        )
    return run


async def _model_run(uow: UnitOfWork, model: BaseModel) -> TrainingRun | None:
    """The run that trained the model, if it is still there: its image size is the one
    the model knows."""
    if model.training_run_id is None:
        return None
    return await uow.runs.get(model.training_run_id)


async def get_evaluation(
    uow: UnitOfWork, model_id: uuid.UUID, evaluation_id: uuid.UUID
) -> TrainingRun:
    """The job of the model's evaluation; NOT_FOUND for another model's or none."""
    async with uow.reading():
        job = await uow.runs.get(evaluation_id)
    return _of_model(job, model_id, evaluation_id)


def _of_model(
    job: TrainingRun | None, model_id: uuid.UUID, evaluation_id: uuid.UUID
) -> TrainingRun:
    if job is None or job.evaluation is None or job.evaluation.trained_model_id != model_id:
        raise NotFound(
            f"model evaluation {evaluation_id} of trained model {model_id} does not exist"
        )
    return job


async def list_evaluations(
    uow: UnitOfWork, filter_: EvaluationFilter, *, limit: int, after: Cursor | None
) -> list[TrainingRun]:
    async with uow.reading():
        return list(await uow.runs.list_evaluations(filter_, limit=limit, after=after))


async def cancel_evaluation(
    uow: UnitOfWork,
    model_id: uuid.UUID,
    evaluation_id: uuid.UUID,
    *,
    reason: str,
    actor: str,
    clock: Clock = utcnow,
) -> TrainingRun:
    """Cancels the evaluation's job: at once when QUEUED, at the worker's next step when
    it runs; cancelling twice is harmless, a finished evaluation cannot be cancelled."""
    async with uow:
        job = _of_model(await uow.runs.get(evaluation_id, for_update=True), model_id, evaluation_id)
        if job.state.is_terminal and job.state is not RunState.CANCELLED:
            raise FailedPrecondition(
                f"model evaluation {evaluation_id} is {job.state}; only an unfinished one is "
                "cancelled"
            )
        job.request_cancel(reason=reason, actor=actor, now=clock())
        await uow.commit()
    return job


def cursor(job: TrainingRun) -> Cursor:
    """The keyset of evaluations: their create time and id, newest first."""
    assert job.evaluation is not None
    return Cursor(job.evaluation.create_time, str(job.id))


def filter_key(filter_: EvaluationFilter) -> dict[str, Any]:
    return {
        "model": str(filter_.trained_model_id),
        "fingerprint": filter_.dataset_fingerprint,
        "split": filter_.split,
        "states": [s.value for s in filter_.states],
        "owner": filter_.model_creator or "",
    }
