"""Resource names: `trainingRuns/{uuid}`, `trainedModels/{uuid}` and a model's
`trainedModels/{uuid}/evaluations/{uuid}`."""

from __future__ import annotations

import uuid

from shared.errors import FieldViolation, InvalidArgument
from shared.limits import quote

TRAINING_RUNS = "trainingRuns"
TRAINED_MODELS = "trainedModels"


def format_name(collection: str, id_: uuid.UUID | str) -> str:
    return f"{collection}/{id_}"


def parse_name(name: str, collection: str, *, field: str = "name") -> uuid.UUID:
    """The id in a resource name; INVALID_ARGUMENT naming `field` when it is not one."""
    prefix = f"{collection}/"
    if name.startswith(prefix):
        try:
            return uuid.UUID(name.removeprefix(prefix))
        except ValueError:
            pass
    raise InvalidArgument(
        [FieldViolation(field, f"expected {collection}/{{uuid}}, got {quote(name)}")]
    )


def run_name(id_: uuid.UUID | str) -> str:
    return format_name(TRAINING_RUNS, id_)


def model_name(id_: uuid.UUID | str) -> str:
    return format_name(TRAINED_MODELS, id_)


EVALUATIONS = "evaluations"


def evaluation_name(model_id: uuid.UUID | str, evaluation_id: uuid.UUID | str) -> str:
    return f"{model_name(model_id)}/{EVALUATIONS}/{evaluation_id}"


def parse_evaluation_name(name: str, *, field: str = "name") -> tuple[uuid.UUID, uuid.UUID]:
    """The model's and the evaluation's ids in `trainedModels/{uuid}/evaluations/{uuid}`;
    INVALID_ARGUMENT naming `field` when it is not one."""
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == TRAINED_MODELS and parts[2] == EVALUATIONS:
        try:
            return uuid.UUID(parts[1]), uuid.UUID(parts[3])
        except ValueError:
            pass
    raise InvalidArgument(
        [
            FieldViolation(
                field,
                f"expected {TRAINED_MODELS}/{{uuid}}/{EVALUATIONS}/{{uuid}}, got {quote(name)}",
            )
        ]
    )
