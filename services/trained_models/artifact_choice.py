"""Which artifact a DownloadArtifact request means: its parent (a model, a training run
or a model evaluation) and the artifact's name or kind. Pure Python."""

from __future__ import annotations

import posixpath
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlparse

from shared.errors import FieldViolation, InvalidArgument, NotFound
from shared.limits import quote
from shared.names import TRAINED_MODELS, TRAINING_RUNS, format_name

_UUID = "[0-9a-fA-F-]{36}"
_EVALUATION = re.compile(rf"{TRAINED_MODELS}/({_UUID})/evaluations/({_UUID})")
_MODEL = re.compile(rf"{TRAINED_MODELS}/({_UUID})")
_RUN = re.compile(rf"{TRAINING_RUNS}/({_UUID})")
MAX_ARTIFACT_NAME = 256


class ParentKind(StrEnum):
    MODEL = "model"
    RUN = "run"
    EVALUATION = "evaluation"


@dataclass(frozen=True, slots=True, kw_only=True)
class Parent:
    kind: ParentKind
    # The model's, the run's or the evaluation's id.
    id: uuid.UUID
    # The model of a model or an evaluation.
    model_id: uuid.UUID | None = None

    @property
    def name(self) -> str:
        if self.kind is ParentKind.RUN:
            return format_name(TRAINING_RUNS, self.id)
        if self.kind is ParentKind.MODEL:
            return format_name(TRAINED_MODELS, self.id)
        return f"{format_name(TRAINED_MODELS, self.model_id or '')}/evaluations/{self.id}"


def parse_parent(name: str) -> Parent:
    """INVALID_ARGUMENT naming `parent` when it names none of the three resources."""
    try:
        if match := _EVALUATION.fullmatch(name):
            return Parent(
                kind=ParentKind.EVALUATION,
                id=uuid.UUID(match[2]),
                model_id=uuid.UUID(match[1]),
            )
        if match := _MODEL.fullmatch(name):
            model_id = uuid.UUID(match[1])
            return Parent(kind=ParentKind.MODEL, id=model_id, model_id=model_id)
        if match := _RUN.fullmatch(name):
            return Parent(kind=ParentKind.RUN, id=uuid.UUID(match[1]))
    except ValueError:
        pass
    raise InvalidArgument(
        [
            FieldViolation(
                "parent",
                "expected trainedModels/{uuid}, trainingRuns/{uuid} or "
                f"trainedModels/{{uuid}}/evaluations/{{uuid}}, got {quote(name)}",
            )
        ]
    )


def validate_wanted(wanted: str) -> None:
    if not wanted:
        raise InvalidArgument([FieldViolation("artifact", "name the artifact, or its kind")])
    if len(wanted) > MAX_ARTIFACT_NAME:
        raise InvalidArgument(
            [FieldViolation("artifact", f"at most {MAX_ARTIFACT_NAME} characters")]
        )


def artifact_name(artifact: Mapping[str, Any]) -> str:
    """An artifact's name; one recorded without a name goes by its file's name."""
    name = str(artifact.get("name") or "")
    if name:
        return name
    return posixpath.basename(urlparse(str(artifact.get("uri", ""))).path)


def choose(artifacts: Sequence[Mapping[str, Any]], wanted: str, parent: str) -> dict[str, Any]:
    """The artifact named `wanted`, else the one artifact of that kind. NOT_FOUND when
    there is neither; INVALID_ARGUMENT (the request is ambiguous) when the kind has
    several files, naming them."""
    named = [a for a in artifacts if artifact_name(a) == wanted]
    if len(named) == 1:
        return dict(named[0])
    of_kind = [a for a in artifacts if a.get("kind") == wanted]
    if len(of_kind) == 1:
        return dict(of_kind[0])
    if len(of_kind) > 1 or len(named) > 1:
        names = sorted(artifact_name(a) for a in (of_kind or named))
        raise InvalidArgument(
            [
                FieldViolation(
                    "artifact",
                    f"{parent} has {len(names)} artifacts of kind {quote(wanted)}; "
                    f"name one: {', '.join(names[:20])}",
                )
            ]
        )
    raise NotFound(f"{parent} has no artifact named or of kind {quote(wanted)}")
