"""Resource names: `trainingRuns/{uuid}` and `trainedModels/{uuid}`."""

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
