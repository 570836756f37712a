"""The values a training run's reports and history carry, typed. Pure Python.

Each mirrors its protobuf message (raven.training.v1) and keeps its proto JSON shape
at the edges: `to_json()` gives what `shared.proto_json.to_dict` gives for the message
(proto field names, defaults left out, int64 as strings, Duration as "1.500s"), and
`from_json()` reads it back. That is how the services store them in JSON columns and
how the wire translation builds protobuf messages from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from shared import json_shape
from shared.json_shape import Json


@dataclass(frozen=True, slots=True, kw_only=True)
class Artifact:
    kind: str = ""
    uri: str = ""
    size_bytes: int = 0
    sha256: str = ""
    # Unique among one resource's artifacts: what DownloadArtifact takes ("worst-1.png").
    name: str = ""
    # The epoch of a stored checkpoint; not part of the wire message.
    epoch: int | None = None

    def to_json(self) -> Json:
        data = json_shape.drop_defaults(
            {
                "kind": self.kind,
                "name": self.name,
                "uri": self.uri,
                "size_bytes": json_shape.int64(self.size_bytes),
                "sha256": self.sha256,
            }
        )
        if self.epoch is not None:
            data["epoch"] = self.epoch
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        epoch = data.get("epoch")
        return cls(
            kind=str(data.get("kind", "")),
            uri=str(data.get("uri", "")),
            size_bytes=int(data.get("size_bytes", 0)),
            sha256=str(data.get("sha256", "")),
            name=str(data.get("name", "")),
            epoch=int(epoch) if epoch is not None else None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetSummary:
    fingerprint: str = ""
    image_count: int = 0
    annotation_count: int = 0
    classes: Sequence[str] = ()
    instances_per_class: Mapping[str, int] = field(default_factory=dict)
    train_image_count: int = 0
    val_image_count: int = 0
    test_image_count: int = 0
    split_seed: int = 0
    split_source: str = ""

    def to_json(self) -> Json:
        return json_shape.drop_defaults(
            {
                "fingerprint": self.fingerprint,
                "image_count": self.image_count,
                "annotation_count": self.annotation_count,
                "classes": list(self.classes),
                "instances_per_class": dict(self.instances_per_class),
                "train_image_count": self.train_image_count,
                "val_image_count": self.val_image_count,
                "test_image_count": self.test_image_count,
                "split_seed": json_shape.int64(self.split_seed),
                "split_source": self.split_source,
            }
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            fingerprint=str(data.get("fingerprint", "")),
            image_count=int(data.get("image_count", 0)),
            annotation_count=int(data.get("annotation_count", 0)),
            classes=tuple(str(c) for c in data.get("classes", ())),
            instances_per_class={
                str(k): int(v) for k, v in data.get("instances_per_class", {}).items()
            },
            train_image_count=int(data.get("train_image_count", 0)),
            val_image_count=int(data.get("val_image_count", 0)),
            test_image_count=int(data.get("test_image_count", 0)),
            split_seed=int(data.get("split_seed", 0)),
            split_source=str(data.get("split_source", "")),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    # Empty when the model detected nothing yet: no mAP is a value, not an error.
    metrics: Mapping[str, float] = field(default_factory=dict)
    epoch: int = 0
    split: str = ""
    per_class_ap: Mapping[str, float] = field(default_factory=dict)
    iou_thresholds: Sequence[float] = ()
    image_count: int = 0

    def to_json(self) -> Json:
        return json_shape.drop_defaults(
            {
                "metrics": json_shape.doubles(self.metrics),
                "epoch": self.epoch,
                "split": self.split,
                "per_class_ap": json_shape.doubles(self.per_class_ap),
                "iou_thresholds": [json_shape.double(t) for t in self.iou_thresholds],
                "image_count": self.image_count,
            }
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            metrics=json_shape.floats(data.get("metrics", {})),
            epoch=int(data.get("epoch", 0)),
            split=str(data.get("split", "")),
            per_class_ap=json_shape.floats(data.get("per_class_ap", {})),
            iou_thresholds=tuple(float(t) for t in data.get("iou_thresholds", ())),
            image_count=int(data.get("image_count", 0)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    epoch: int = 0
    max_epochs: int = 0
    iteration: int = 0
    max_iterations: int = 0
    # Total loss of the last iteration and its parts (loss_cls, loss_bbox, ...).
    loss: float = 0.0
    losses: Mapping[str, float] = field(default_factory=dict)
    # 0 when not reported.
    learning_rate: float = 0.0
    eta_s: float | None = None

    def to_json(self) -> Json:
        return json_shape.drop_defaults(
            {
                "epoch": self.epoch,
                "max_epochs": self.max_epochs,
                "iteration": json_shape.int64(self.iteration),
                "max_iterations": json_shape.int64(self.max_iterations),
                "loss": json_shape.double(self.loss),
                "losses": json_shape.doubles(self.losses),
                "learning_rate": json_shape.double(self.learning_rate),
                "eta": json_shape.duration(self.eta_s) if self.eta_s is not None else None,
            }
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        eta = data.get("eta")
        return cls(
            epoch=int(data.get("epoch", 0)),
            max_epochs=int(data.get("max_epochs", 0)),
            iteration=int(data.get("iteration", 0)),
            max_iterations=int(data.get("max_iterations", 0)),
            loss=float(data.get("loss", 0.0)),
            losses=json_shape.floats(data.get("losses", {})),
            learning_rate=float(data.get("learning_rate", 0.0)),
            eta_s=json_shape.seconds(eta) if eta is not None else None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DataLoading:
    workers: int = 0
    persistent_workers: bool = False
    pin_memory: bool = False

    def to_json(self) -> Json:
        return json_shape.drop_defaults(
            {
                "workers": self.workers,
                "persistent_workers": self.persistent_workers,
                "pin_memory": self.pin_memory,
            }
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            workers=int(data.get("workers", 0)),
            persistent_workers=bool(data.get("persistent_workers", False)),
            pin_memory=bool(data.get("pin_memory", False)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingFacts:
    duration_s: float | None = None
    epochs_trained: int = 0
    # 0 when unknown.
    best_epoch: int = 0
    parameter_count: int = 0
    device: str = ""
    data_loading: DataLoading | None = None

    def to_json(self) -> Json:
        return json_shape.drop_defaults(
            {
                "duration": json_shape.duration(self.duration_s)
                if self.duration_s is not None
                else None,
                "epochs_trained": self.epochs_trained,
                "best_epoch": self.best_epoch,
                "parameter_count": json_shape.int64(self.parameter_count),
                "device": self.device,
                "data_loading": self.data_loading.to_json() if self.data_loading else None,
            }
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        duration, loading = data.get("duration"), data.get("data_loading")
        return cls(
            duration_s=json_shape.seconds(duration) if duration is not None else None,
            epochs_trained=int(data.get("epochs_trained", 0)),
            best_epoch=int(data.get("best_epoch", 0)),
            parameter_count=int(data.get("parameter_count", 0)),
            device=str(data.get("device", "")),
            data_loading=DataLoading.from_json(loading) if loading is not None else None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochMetrics:
    """One entry of a run's per-epoch series (TrainingRunMetrics.EpochMetrics)."""

    epoch: int
    train: Mapping[str, float] = field(default_factory=dict)
    val: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> Json:
        # The stored series keeps every key, empty or not.
        return {
            "epoch": self.epoch,
            "train": json_shape.doubles(self.train),
            "val": json_shape.doubles(self.val),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            epoch=int(data.get("epoch", 0)),
            train=json_shape.floats(data.get("train", {})),
            val=json_shape.floats(data.get("val", {})),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    code: str = ""
    message: str = ""

    def to_json(self) -> Json:
        return json_shape.drop_defaults({"code": self.code, "message": self.message})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(code=str(data.get("code", "")), message=str(data.get("message", "")))


def artifacts_to_json(artifacts: Sequence[Artifact]) -> list[Json]:
    return [a.to_json() for a in artifacts]


def artifacts_from_json(data: Sequence[Mapping[str, Any]] | None) -> list[Artifact]:
    return [Artifact.from_json(a) for a in data or ()]
