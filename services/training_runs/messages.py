"""Translation between the domain and the wire: protobuf messages for gRPC
responses, outbox events and training jobs."""

from __future__ import annotations

import dataclasses
import uuid
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from services.training_runs.domain import RunEvent, RunState, TrainingRun
from services.training_runs.spec import SpecRequest
from shared.json_shape import Payload
from shared.messaging import Subjects
from shared.names import evaluation_name, model_name, run_name
from shared.outbox import OutboxMessage
from shared.proto.raven.training.v1 import common_pb2, training_run_pb2, worker_pb2
from shared.proto_json import parse, timestamp

if TYPE_CHECKING:
    # The repository stores what `stored_message` makes.
    from services.training_runs.repository import BaseModel

# The lifecycle subject of each state: `training_run.<state>`, e.g. `training_run.preparing`.
LIFECYCLE_SUBJECTS = {state: state.value.lower() for state in RunState}


def spec_request(spec: training_run_pb2.TrainingSpec) -> SpecRequest:
    """The spec as sent: a SpecRequest field whose default is None is an optional field of
    TrainingSpec, None when the caller left it unset."""
    optional = {
        field.name: getattr(spec, field.name) if spec.HasField(field.name) else None
        for field in dataclasses.fields(SpecRequest)
        if field.default is None
    }
    return SpecRequest(
        dataset_uri=spec.dataset_uri.strip(),
        image_root=spec.image_root.strip(),
        architecture=spec.architecture.strip(),
        device=training_run_pb2.TrainingSpec.Device.Name(spec.device),
        optimizer=training_run_pb2.TrainingSpec.Optimizer.Name(spec.optimizer),
        **optional,
    )


def run_to_proto(run: TrainingRun) -> training_run_pb2.TrainingRun:
    message = _stored_fields(run)
    with_joined_fields(
        message,
        run_id=run.id,
        trained_model_id=run.trained_model_id,
        evaluated_model_id=run.evaluation.trained_model_id if run.evaluation else None,
    )
    return message


def stored_message(run: TrainingRun) -> bytes:
    """The run as reads return it but for the fields of other rows (`with_joined_fields`):
    what training_runs.proto holds, written with every change of the run."""
    return _stored_fields(run).SerializeToString(deterministic=True)


def with_joined_fields(
    message: training_run_pb2.TrainingRun,
    *,
    run_id: uuid.UUID,
    trained_model_id: uuid.UUID | None,
    evaluated_model_id: uuid.UUID | None,
) -> training_run_pb2.TrainingRun:
    """Sets what other tables say of the run: the model the registry made of it (which
    another service writes, and may delete), and the evaluation an evaluation job runs
    (gone with its model)."""
    if trained_model_id:
        message.trained_model = model_name(trained_model_id)
    if evaluated_model_id:
        message.model_evaluation = evaluation_name(evaluated_model_id, run_id)
    return message


def _stored_fields(run: TrainingRun) -> training_run_pb2.TrainingRun:
    message = training_run_pb2.TrainingRun(
        name=run_name(run.id),
        display_name=run.display_name,
        labels=run.labels,
        state=run.state.value,
        spec=parse(run.spec, training_run_pb2.TrainingSpec()),
        base_model=model_name(run.base_model_id) if run.base_model_id else "",
        attempt=run.attempt,
        creator=run.creator,
        create_time=timestamp(run.create_time),
        update_time=timestamp(run.update_time),
        start_time=timestamp(run.start_time),
        end_time=timestamp(run.end_time),
        etag=run.etag,
        retry_of=run_name(run.retry_of_id) if run.retry_of_id else "",
        artifacts=[parse(a.to_json(), common_pb2.Artifact()) for a in run.artifacts],
        kind=run.kind.name,
    )
    payloads: tuple[tuple[Payload | None, Message], ...] = (
        (run.progress, message.progress),
        (run.latest_evaluation, message.latest_evaluation),
        (run.best_evaluation, message.best_evaluation),
        (run.test_evaluation, message.test_evaluation),
        (run.dataset, message.dataset),
        (run.facts, message.facts),
    )
    for payload, field in payloads:
        if payload:
            parse(payload.to_json(), field)
    if run.failure:
        message.failure.reason = run.failure.reason
        message.failure.message = run.failure.message
        message.failure.artifacts.extend(a for a in message.artifacts if a.kind == "log")
    return message


def event_to_proto(event: RunEvent) -> training_run_pb2.TrainingRunEvent:
    message = training_run_pb2.TrainingRunEvent(
        training_run=run_name(event.run_id),
        sequence=event.sequence,
        time=timestamp(event.time),
        attempt=event.attempt,
        actor=event.actor,
    )
    payload = getattr(message, event.kind.value)
    payload.SetInParent()
    parse(event.payload.to_json(), payload)
    return message


def job_message(run: TrainingRun, base: BaseModel | None, subjects: Subjects) -> OutboxMessage:
    """The job of the run's attempt. `base`: the model a training run fine-tunes, or the
    model an evaluation job evaluates (which then goes in `evaluation`, not `base_model`)."""
    job = worker_pb2.TrainingJob(
        training_run=run_name(run.id),
        attempt=run.attempt,
        spec=parse(run.spec, training_run_pb2.TrainingSpec()),
    )
    if run.evaluation is not None:
        wanted = run.evaluation
        job.evaluation.name = evaluation_name(wanted.trained_model_id, run.id)
        job.evaluation.split = wanted.split
        job.evaluation.score_threshold = wanted.score_threshold
        job.evaluation.iou_threshold = wanted.iou_threshold
        job.evaluation.samples = wanted.samples
        if base is not None:
            _base_model(base, job.evaluation.model)
    elif base is not None:
        _base_model(base, job.base_model)
    return OutboxMessage(
        subject=subjects.job(str(run.id)),
        payload=job.SerializeToString(),
        msg_id=f"job.{run.id}.{run.attempt}",
    )


def _base_model(base: BaseModel, message: worker_pb2.TrainingJob.BaseModel) -> None:
    message.name = model_name(base.id)
    message.architecture = base.architecture
    message.classes.extend(base.classes)
    checkpoint = next((a for a in base.artifacts if a.get("kind") == "checkpoint"), None)
    if checkpoint:
        parse(checkpoint, message.checkpoint)


def outbox_messages(run: TrainingRun, subjects: Subjects) -> list[OutboxMessage]:
    """Each new history entry on the run's subject, and each state change on its
    lifecycle subject with the run as it is now."""
    messages: list[OutboxMessage] = []
    snapshot: training_run_pb2.TrainingRun | None = None
    for event in run.new_events:
        proto = event_to_proto(event)
        messages.append(
            OutboxMessage(
                subject=subjects.run_event(str(run.id)),
                payload=proto.SerializeToString(),
                msg_id=f"run_event.{run.id}.{event.sequence}",
            )
        )
        change = event.state_change
        if change is not None:
            snapshot = snapshot or run_to_proto(run)
            event_id = f"{run.id}.{event.sequence}"
            changed = training_run_pb2.TrainingRunStateChanged(
                event_id=event_id, event=proto, training_run=snapshot
            )
            messages.append(
                OutboxMessage(
                    subject=subjects.run_state(str(run.id)),
                    payload=proto.SerializeToString(),
                    msg_id=f"run_state.{run.id}.{event.sequence}",
                )
            )
            verb = LIFECYCLE_SUBJECTS[change.to_state]
            messages.append(
                OutboxMessage(
                    subject=subjects.run_lifecycle(verb),
                    payload=changed.SerializeToString(),
                    msg_id=f"training_run.{verb}.{event_id}",
                )
            )
    return messages
