"""The row of a trained model, as a domain object and back: the one place that knows
both the columns and the aggregate's fields."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row

from services.trained_models.domain import Origin, TrainedModel


def to_model(row: Row[Any]) -> TrainedModel:
    m = row._mapping
    return TrainedModel(
        id=m["id"],
        display_name=m["display_name"],
        description=m["description"],
        labels=m["labels"],
        training_run_id=m["training_run_id"],
        base_model_id=m["base_model_id"],
        dataset_uri=m["dataset_uri"],
        dataset_fingerprint=m["dataset_fingerprint"],
        architecture=m["architecture"],
        classes=m["classes"],
        artifacts=m["artifacts"],
        evaluation=m["evaluation"],
        val_evaluation=m["val_evaluation"],
        facts=m["facts"],
        published=m["published"],
        channel=m["channel"],
        publish_time=m["publish_time"],
        published_by=m["published_by"],
        creator=m["creator"],
        origin=Origin(m["origin"]),
        request_id=m["request_id"],
        version=m["version"],
        create_time=m["create_time"],
        update_time=m["update_time"],
    )


def model_values(model: TrainedModel) -> dict[str, Any]:
    return {
        "display_name": model.display_name,
        "description": model.description,
        "labels": model.labels,
        "training_run_id": model.training_run_id,
        "base_model_id": model.base_model_id,
        "dataset_uri": model.dataset_uri,
        "dataset_fingerprint": model.dataset_fingerprint,
        "architecture": model.architecture,
        "classes": model.classes,
        "artifacts": model.artifacts,
        "evaluation": model.evaluation,
        "val_evaluation": model.val_evaluation,
        "facts": model.facts,
        "bbox_map": model.bbox_map,
        "published": model.published,
        "channel": model.channel,
        "publish_time": model.publish_time,
        "published_by": model.published_by,
        "creator": model.creator,
        "origin": model.origin.value,
        "request_id": model.request_id,
        "version": model.version,
        "create_time": model.create_time,
        "update_time": model.update_time,
    }
