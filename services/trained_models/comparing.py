"""CompareTrainedModels: the models' metrics side by side, from evaluations on one set
of images (services/trained_models/comparison.py decides which)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from services.trained_models import comparison
from services.trained_models.evaluation_reads import EvaluationReads
from services.trained_models.unit_of_work import UnitOfWork
from shared.errors import Violations
from shared.identity import missing, visible
from shared.names import TRAINED_MODELS

MIN_MODELS = 2
MAX_MODELS = 20
# As the request guard bounds it (shared/limits.py).
MAX_FINGERPRINT = 128


@dataclass(frozen=True, slots=True, kw_only=True)
class CompareCommand:
    model_ids: Sequence[uuid.UUID]
    dataset_fingerprint: str = ""
    split: str = ""
    # A caller that may see only this identity's models: another's is reported missing.
    owner: str | None = None


def validate(command: CompareCommand) -> None:
    violations = Violations()
    count = len(command.model_ids)
    violations.check(
        MIN_MODELS <= count <= MAX_MODELS,
        "trained_models",
        f"{MIN_MODELS} to {MAX_MODELS} models, got {count}",
    )
    violations.check(
        len(set(command.model_ids)) == count, "trained_models", "each model at most once"
    )
    violations.check(
        command.split in ("", *comparison.SPLITS),
        "split",
        "one of: " + ", ".join(repr(s) for s in comparison.SPLITS),
    )
    violations.check(
        len(command.dataset_fingerprint) <= MAX_FINGERPRINT,
        "dataset_fingerprint",
        f"at most {MAX_FINGERPRINT} characters",
    )
    violations.raise_if_any()


async def compare(uow: UnitOfWork, command: CompareCommand) -> comparison.ComparedModels:
    """NOT_FOUND for a model that does not exist; FAILED_PRECONDITION when the models
    have no evaluations on common images. Two queries, whatever the number of models."""
    validate(command)
    async with uow.reading():
        reads = EvaluationReads(uow.session)
        found = await reads.models(command.model_ids)
        for model_id in command.model_ids:
            if model_id not in found or not visible(command.owner, found[model_id][1]):
                raise missing(TRAINED_MODELS, model_id)
        records = await reads.succeeded(
            command.model_ids,
            dataset_fingerprint=command.dataset_fingerprint,
            split=command.split,
        )
    table = comparison.table(
        command.model_ids,
        records,
        dataset_fingerprint=command.dataset_fingerprint,
        split=command.split,
    )
    return comparison.ComparedModels(table=table, display_names={k: v[0] for k, v in found.items()})
