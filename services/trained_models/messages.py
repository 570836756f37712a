"""Translation between the model registry's domain and the wire."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message

from services.trained_models.comparison import ComparedModels
from services.trained_models.domain import Lineage, LineageNode, PublicationEvent, TrainedModel
from shared.messaging import Subjects
from shared.names import model_name, run_name
from shared.outbox import OutboxMessage
from shared.proto.raven.training.v1 import common_pb2, trained_model_pb2, training_run_pb2
from shared.proto_json import parse, timestamp, to_dict


def model_to_proto(model: TrainedModel) -> trained_model_pb2.TrainedModel:
    message = trained_model_pb2.TrainedModel(
        name=model_name(model.id),
        display_name=model.display_name,
        description=model.description,
        labels=model.labels,
        training_run=run_name(model.training_run_id) if model.training_run_id else "",
        base_model=model_name(model.base_model_id) if model.base_model_id else "",
        dataset_uri=model.dataset_uri,
        dataset_fingerprint=model.dataset_fingerprint,
        architecture=model.architecture,
        classes=model.classes,
        artifacts=[parse(a, common_pb2.Artifact()) for a in model.artifacts],
        creator=model.creator,
        create_time=timestamp(model.create_time),
        update_time=timestamp(model.update_time),
        etag=model.etag,
    )
    if model.evaluation:
        parse(model.evaluation, message.evaluation)
    if model.val_evaluation:
        parse(model.val_evaluation, message.val_evaluation)
    if model.facts:
        parse(model.facts, message.facts)
    message.publication.published = model.published
    if model.published:
        message.publication.channel = model.channel or ""
        message.publication.published_by = model.published_by or ""
        publish_time = timestamp(model.publish_time)
        if publish_time is not None:
            message.publication.publish_time.CopyFrom(publish_time)
    return message


def model_from_run(run_id: uuid.UUID, run: Mapping[str, Any]) -> TrainedModel:
    """The model a succeeded run produced, from the run's record (Repository.succeeded_run).
    It is judged by its test evaluation when the run had a test split: the validation
    chose the checkpoint, so its mAP flatters the model."""
    now = datetime.now(UTC)
    spec = parse(run["spec"], training_run_pb2.TrainingSpec())
    dataset = parse(run["dataset"], common_pb2.DatasetSummary())
    val = _normalised(run["best_evaluation"], common_pb2.Evaluation())
    test = _normalised(run["test_evaluation"], common_pb2.Evaluation())
    return TrainedModel(
        id=uuid.uuid4(),
        display_name=run["display_name"],
        labels=dict(run["labels"] or {}),
        training_run_id=run_id,
        base_model_id=run["base_model_id"],
        dataset_uri=spec.dataset_uri,
        dataset_fingerprint=dataset.fingerprint,
        architecture=spec.architecture,
        classes=list(dataset.classes),
        artifacts=[to_dict(parse(a, common_pb2.Artifact())) for a in run["artifacts"] or ()],
        evaluation=test or val,
        val_evaluation=val,
        facts=_normalised(run["facts"], common_pb2.TrainingFacts()),
        creator=run["creator"],
        create_time=now,
        update_time=now,
    )


def _normalised(stored: Mapping[str, Any] | None, message: Message) -> dict[str, Any] | None:
    """A stored proto JSON payload in the shape the registry stores; None when unset."""
    return to_dict(parse(stored, message)) if stored else None


def created_message(model: TrainedModel, subjects: Subjects) -> OutboxMessage:
    return OutboxMessage(
        subject=subjects.model_lifecycle("created"),
        payload=model_to_proto(model).SerializeToString(),
        msg_id=f"trained_model.created.{model.id}",
    )


def lifecycle_message(what: str, model: TrainedModel, subjects: Subjects) -> OutboxMessage:
    """`trained_model.<what>` with the model as it is after the change."""
    return OutboxMessage(
        subject=subjects.model_lifecycle(what),
        payload=model_to_proto(model).SerializeToString(),
        msg_id=f"trained_model.{what}.{model.id}.{model.version}",
    )


def publication_event_to_proto(event: PublicationEvent) -> trained_model_pb2.PublicationEvent:
    message = trained_model_pb2.PublicationEvent(
        trained_model=model_name(event.trained_model_id),
        action=event.action.value,
        channel=event.channel,
        actor=event.actor,
        reason=event.reason,
        time=timestamp(event.time),
        replaced_model=model_name(event.replaced_model_id) if event.replaced_model_id else "",
    )
    if event.bbox_map is not None:
        message.bbox_map = event.bbox_map
    if event.incumbent_comparison:
        parse(event.incumbent_comparison, message.incumbent_comparison)
    return message


def comparison_to_proto(compared: ComparedModels) -> trained_model_pb2.ModelComparison:
    table = compared.table
    return trained_model_pb2.ModelComparison(
        dataset_fingerprint=table.images.dataset_fingerprint,
        split=table.images.split,
        images_fingerprint=table.images.images_fingerprint,
        image_count=table.image_count,
        metrics=table.metrics,
        rows=[
            trained_model_pb2.ModelComparison.Row(
                trained_model=model_name(model_id),
                display_name=compared.display_names.get(model_id, ""),
                evaluation=record.name,
                values=dict(record.values),
            )
            for model_id, record in table.rows
        ],
    )


def _node(node: LineageNode) -> trained_model_pb2.TrainedModelLineage.LineageNode:
    message = trained_model_pb2.TrainedModelLineage.LineageNode(
        trained_model=model_name(node.id),
        display_name=node.display_name,
        base_model=model_name(node.base_model_id) if node.base_model_id else "",
        training_run=run_name(node.training_run_id) if node.training_run_id else "",
        dataset_fingerprint=node.dataset_fingerprint,
        depth=node.depth,
    )
    if node.bbox_map is not None:
        message.bbox_map = node.bbox_map
    return message


def lineage_to_proto(lineage: Lineage) -> trained_model_pb2.TrainedModelLineage:
    return trained_model_pb2.TrainedModelLineage(
        ancestors=[_node(n) for n in lineage.ancestors],
        descendants=[_node(n) for n in lineage.descendants],
    )
