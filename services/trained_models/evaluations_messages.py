"""Model evaluations on the wire: a ModelEvaluation from the job that runs it."""

from __future__ import annotations

from services.training_runs.domain import RunState, TrainingRun
from shared.names import evaluation_name, run_name
from shared.proto.raven.training.v1 import common_pb2
from shared.proto.raven.training.v1 import trained_model_pb2 as pb
from shared.proto_json import parse, timestamp


def evaluation_to_proto(job: TrainingRun) -> pb.ModelEvaluation:
    """What was asked for, the job's state and, once it succeeded, what it found. The
    dataset fingerprint is known from when the worker prepared the dataset."""
    wanted = job.evaluation
    assert wanted is not None, "not an evaluation job"
    fingerprint = wanted.dataset_fingerprint or (job.dataset.fingerprint if job.dataset else "")
    message = pb.ModelEvaluation(
        name=evaluation_name(wanted.trained_model_id, job.id),
        job=run_name(job.id),
        state=job.state.value,
        dataset_uri=wanted.dataset_uri,
        image_root=wanted.image_root,
        split=wanted.split,
        split_of=run_name(wanted.split_of_id) if wanted.split_of_id else "",
        score_threshold=wanted.score_threshold,
        iou_threshold=wanted.iou_threshold,
        dataset_fingerprint=fingerprint,
        image_count=wanted.image_count or 0,
        artifacts=[parse(a.to_json(), common_pb2.Artifact()) for a in wanted.artifacts],
        creator=wanted.creator,
        create_time=timestamp(wanted.create_time),
        end_time=timestamp(job.end_time),
    )
    if wanted.evaluation is not None:
        parse(wanted.evaluation.to_json(), message.evaluation)
    if wanted.review is not None:
        parse(wanted.review, message.review)
    if job.failure and job.state in (RunState.FAILED, RunState.CANCELLED):
        message.failure.reason = job.failure.reason
        message.failure.message = job.failure.message
        message.failure.artifacts.extend(
            parse(a.to_json(), common_pb2.Artifact()) for a in job.artifacts if a.kind == "log"
        )
    return message
