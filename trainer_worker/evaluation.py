"""One attempt of an evaluation job (a TrainingJob with `evaluation`), to its terminal event.

preparing (the claim) -> dataset_prepared -> (notices) -> running -> progress per batch ->
succeeded{artifacts, evaluation, review} | failed | cancelled, as for training
(trainer_worker.pipeline): the dataset is prepared and split as a training run splits it,
the model's checkpoint is used only with the sha256 the system recorded, inference runs in
a child process (trainer_worker.evaluate_process), and the worker process reviews its
detections, draws the samples and the PR curves and stores them as the job's artifacts.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from google.protobuf.duration_pb2 import Duration

from shared.proto.raven.training.v1 import common_pb2, worker_pb2
from shared.storage import StorageError, sha256_file
from trainer_worker import events, storage_faults
from trainer_worker.architectures import UnknownArchitecture, mmdet_configs_root
from trainer_worker.dataset import DatasetError, PreparedDataset
from trainer_worker.evaluation_config import InferenceInputs, inference_config
from trainer_worker.evaluation_inputs import (
    EvaluationRefused,
    Thresholds,
    checked_request,
    class_differences,
    detections,
    ground_truth,
    images_fingerprint,
    label_categories,
    split_image_ids,
)
from trainer_worker.evaluation_results import (
    Findings,
    evaluation_message,
    review_and_draw,
    review_message,
)
from trainer_worker.inference import InferenceDone, run_inference
from trainer_worker.inputs import prepare, verified_file
from trainer_worker.job import Attempt, JobFailed, JobOutcome, StopReason
from trainer_worker.outcomes import TrainingCancelled, TrainingFailed
from trainer_worker.placement import device_env, place
from trainer_worker.plan import ConfigError, TrainingPlan, plan_of
from trainer_worker.relay import ChildEventRelay
from trainer_worker.upload import stored_log, upload_failure

log = structlog.get_logger(__name__)

LOG_FILE = "evaluation.log"


def evaluation_dir(artifact_root: Path, run_id: str) -> Path:
    """Where an evaluation job's artifacts are written (and kept, without object storage)."""
    return artifact_root / "evaluations" / run_id


async def execute_evaluation(attempt: Attempt) -> JobOutcome:
    """Runs one attempt of an evaluation job and publishes its events, the terminal one
    included (except when interrupted by a shutdown)."""
    log_path = attempt.folder / LOG_FILE
    try:
        outcome = await _under_root(attempt, log_path)
    except (JobFailed, DatasetError) as failure:
        log.info("evaluation failed", run_id=attempt.run_id, reason=failure.reason)
        return await attempt.fail(failure.reason, failure.message)
    if isinstance(outcome, Evaluated):
        return await _succeed(attempt, outcome)
    if isinstance(outcome, TrainingFailed):
        stored = await stored_log(log_path, attempt.run_id, attempt.number, attempt.environment)
        return await attempt.fail(outcome.reason, outcome.message, *([stored] if stored else []))
    if attempt.control.reason is StopReason.CANCEL:
        await attempt.publisher.publish(critical=True, cancelled=worker_pb2.WorkerEvent.Cancelled())
        return JobOutcome.CANCELLED
    await attempt.notice("worker_stopping", "the worker stopped; the job is queued again")
    return JobOutcome.INTERRUPTED


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluated:
    """Inference done and reviewed: the findings and how inference ran."""

    findings: Findings
    inference: InferenceDone
    split: str
    thresholds: Thresholds


async def _under_root(
    attempt: Attempt, log_path: Path
) -> Evaluated | TrainingFailed | TrainingCancelled:
    """_evaluate, with a failure to write under the artifact root as the job's failure."""
    try:
        return await _evaluate(attempt, log_path)
    except OSError as error:
        fault = storage_faults.fault_of(error, within=attempt.environment.artifact_root)
        if fault is None:
            raise
        raise JobFailed(fault[0], storage_faults.message(*fault)) from None


async def _evaluate(
    attempt: Attempt, log_path: Path
) -> Evaluated | TrainingFailed | TrainingCancelled:
    job, environment = attempt.job, attempt.environment
    request = job.evaluation
    try:
        thresholds = checked_request(
            request.split,
            score=request.score_threshold,
            iou=request.iou_threshold,
            samples=request.samples,
        )
    except EvaluationRefused as refused:
        raise JobFailed(refused.reason, refused.message) from None
    plan = _plan(job)
    await asyncio.to_thread(_fresh_dir, attempt.folder)
    prepared = await asyncio.to_thread(
        prepare, job.spec, plan, attempt.folder / "dataset", environment
    )
    await attempt.publisher.publish(dataset_prepared=events.dataset_summary(prepared))
    if attempt.control.stop.is_set():
        return TrainingCancelled()
    chosen = await asyncio.to_thread(_choose, prepared, request, attempt.folder / "images.json")
    if chosen.differences:
        await attempt.notice("classes_differ", chosen.differences)
    checkpoint = await verified_file(
        request.model.checkpoint,
        what=f"model {request.model.name}",
        environment=environment,
        inputs=attempt.folder / "inputs",
    )
    spec = type(job.spec)()
    spec.CopyFrom(job.spec)
    # One device: inference of one model needs no distributed launcher.
    spec.ClearField("gpu_count")
    placement = place(spec, environment, batch_size=plan.batch_size)
    for code, message in placement.notices:
        await attempt.notice(code, message)
    predictions_path = attempt.folder / "predictions.json"
    config_path = attempt.folder / "config.py"
    text = _config(
        InferenceInputs(
            architecture=plan.architecture,
            model_classes=tuple(request.model.classes),
            images_path=chosen.images_path,
            dataset_classes=prepared.classes,
            checkpoint=checkpoint,
            predictions_path=predictions_path,
            image_size=plan.image_size,
            batch_size=plan.batch_size,
            num_workers=placement.loading.workers,
            pin_memory=placement.loading.pin_memory,
        )
    )
    await asyncio.to_thread(config_path.write_text, text)
    wanted, gpus = placement.gpus, environment.gpus
    if wanted and gpus.would_wait(wanted):
        await attempt.notice("waiting_for_gpus", f"waiting for {wanted} GPU of this worker")
    leased = await gpus.acquire(wanted or 0, unless=attempt.control.stop)
    if leased is None:
        return TrainingCancelled()
    relay = ChildEventRelay(
        publisher=attempt.publisher,
        environment=environment,
        run_id=attempt.run_id,
        attempt=attempt.number,
        prepared=prepared,
        placed=frozenset(),
    )
    try:
        outcome = await run_inference(
            config_path=config_path,
            predictions_path=predictions_path,
            log_path=log_path,
            on_event=relay,
            stop=attempt.control.stop,
            env=device_env(leased, cpu=placement.gpus is None),
        )
    finally:
        gpus.release(leased)
    if not isinstance(outcome, InferenceDone):
        return outcome
    # A cancel that arrives after the last batch still cancels: nothing is published yet.
    if attempt.control.stop.is_set():
        return TrainingCancelled()
    found = detections(outcome.predictions, chosen.mapping)
    summary = {
        "model": request.model.name,
        "evaluation": request.name,
        "split": request.split,
        "dataset_fingerprint": prepared.fingerprint,
        "image_count": len(chosen.truth["images"]),
    }
    folder = evaluation_dir(environment.artifact_root, attempt.run_id)
    await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)
    findings = await asyncio.to_thread(
        review_and_draw,
        truth=chosen.truth,
        detections=found,
        thresholds=thresholds,
        image_paths=chosen.image_paths,
        images_fingerprint=images_fingerprint(chosen.truth["images"]),
        summary=summary,
        folder=folder,
    )
    if attempt.control.stop.is_set():
        await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)
        return TrainingCancelled()
    return Evaluated(
        findings=findings, inference=outcome, split=request.split, thresholds=thresholds
    )


def _plan(job: worker_pb2.TrainingJob) -> TrainingPlan:
    spec = job.spec
    if not spec.architecture and job.evaluation.model.architecture:
        spec = type(spec)()
        spec.CopyFrom(job.spec)
        spec.architecture = job.evaluation.model.architecture
    try:
        return plan_of(spec, fine_tune=True)
    except ConfigError as error:
        raise JobFailed("invalid_spec", str(error)) from None


def _config(inputs: InferenceInputs) -> str:
    try:
        return inference_config(inputs, configs_root=mmdet_configs_root())
    except RuntimeError as error:
        raise JobFailed("worker_misconfigured", str(error)) from None
    except (ConfigError, UnknownArchitecture) as error:
        raise JobFailed("invalid_spec", str(error)) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Chosen:
    """The images an evaluation runs on (trainer_worker.evaluation_inputs)."""

    # The split's COCO document in the dataset's own ids and file names.
    truth: dict[str, Any]
    # Model label -> the dataset's category id.
    mapping: dict[int, int]
    # Image id -> its file, as the worker found it.
    image_paths: dict[int, Path]
    # The COCO file of the images inference reads.
    images_path: Path
    differences: str | None


def _choose(
    prepared: PreparedDataset, request: worker_pb2.TrainingJob.EvaluationJob, images_path: Path
) -> _Chosen:
    """The split's ground truth in the dataset's own ids, the model's labels mapped onto its
    categories, and the COCO file of its images that inference reads (written to
    `images_path`)."""
    membership = json.loads(prepared.split_path.read_text())
    try:
        ids = split_image_ids(request.split, membership)
        # The annotation file as given: its ids and file names are what the findings name.
        document = json.loads(prepared.annotation_path.read_text())
        truth = ground_truth(document, ids)
        mapping = label_categories(tuple(request.model.classes), truth["categories"])
    except EvaluationRefused as refused:
        raise JobFailed(refused.reason, refused.message) from None
    wanted = set(ids)
    images: list[Mapping[str, Any]] = []
    categories: list[Any] = []
    for path in (prepared.train_path, prepared.val_path, prepared.test_path):
        if path is None:
            continue
        subset = json.loads(path.read_text())
        categories = subset["categories"]
        images.extend(i for i in subset["images"] if i["id"] in wanted)
    images.sort(key=lambda i: i["id"])
    images_path.write_text(
        json.dumps({"images": images, "annotations": [], "categories": categories})
    )
    return _Chosen(
        truth=truth,
        mapping=mapping,
        image_paths={int(i["id"]): Path(i["file_name"]) for i in images},
        images_path=images_path,
        differences=class_differences(tuple(request.model.classes), truth["categories"]),
    )


async def _succeed(attempt: Attempt, outcome: Evaluated) -> JobOutcome:
    findings = outcome.findings
    try:
        artifacts = await _store(findings, attempt)
    except (StorageError, OSError) as error:
        reason, message = upload_failure(error, attempt.environment.artifact_root)
        message = message.replace("the trained model could not", "the evaluation could not")
        log.warning("evaluation failed", run_id=attempt.run_id, reason=reason, message=message)
        return await attempt.fail(reason, message)
    duration = Duration()
    duration.FromMilliseconds(round(outcome.inference.duration_s * 1000))
    succeeded = worker_pb2.WorkerEvent.Succeeded(
        artifacts=artifacts,
        facts=common_pb2.TrainingFacts(duration=duration, device=outcome.inference.device),
        evaluation=evaluation_message(findings, split=outcome.split),
        review=review_message(findings, outcome.thresholds),
    )
    await attempt.publisher.publish(critical=True, succeeded=succeeded)
    return JobOutcome.SUCCEEDED


async def _store(findings: Findings, attempt: Attempt) -> list[common_pb2.Artifact]:
    """The findings' files as artifacts: the local files, or their copies in object storage
    (the local ones then removed)."""
    storage = attempt.environment.store()
    artifacts: list[common_pb2.Artifact] = []
    for item in findings.files:
        if storage.remote:
            stored = await asyncio.to_thread(
                storage.put_artifact, item.path, f"evaluations/{attempt.run_id}/{item.name}"
            )
            uri, size, digest = stored.uri, stored.size_bytes, stored.sha256
        else:
            uri = item.path.as_uri()
            size = item.path.stat().st_size
            digest = await asyncio.to_thread(sha256_file, item.path)
        artifacts.append(
            common_pb2.Artifact(
                kind=item.kind, name=item.name, uri=uri, size_bytes=size, sha256=digest
            )
        )
    if storage.remote:
        folder = evaluation_dir(attempt.environment.artifact_root, attempt.run_id)
        await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)
    return artifacts


def _fresh_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
