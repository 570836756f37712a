"""The publication gate against the incumbent: the model a channel serves now. Pure Python.

A candidate replaces the incumbent only when both were evaluated on the same images
(dataset fingerprint, split and image set) and the candidate is not worse there by
more than a tolerance on one metric. The benchmark is the incumbent's newest
evaluation that the candidate has a match for; the candidate's newest evaluation on
those images answers it. Older evaluations do not count: the newest one of each model
is what it is known for.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.trained_models.comparison import (
    EvaluationRecord,
    ImageSet,
    is_metric_name,
    newest_by_model,
)
from shared.errors import FailedPrecondition, Violations
from shared.metrics import PRIMARY_METRIC
from shared.names import model_name

# Rounding of metrics stored as JSON doubles must not refuse an equal candidate.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class IncumbentPolicy:
    """What the server requires of every publication (RAVEN_PUBLISH_REQUIRE_INCUMBENT,
    RAVEN_PUBLISH_INCUMBENT_TOLERANCE)."""

    require: bool = False
    tolerance: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class IncumbentRule:
    metric: str
    tolerance: float


def validate(violations: Violations, *, metric: str, tolerance: float | None) -> None:
    violations.check(
        not metric or is_metric_name(metric),
        "incumbent_metric",
        "a COCO metric such as 'coco/bbox_mAP', or 'AP/<class>'",
    )
    if tolerance is not None:
        violations.check(0.0 <= tolerance <= 1.0, "incumbent_tolerance", "between 0 and 1")


def rule_for(
    policy: IncumbentPolicy,
    *,
    beat_incumbent: bool | None,
    metric: str,
    tolerance: float | None,
) -> IncumbentRule | None:
    """The comparison a publication needs, or None. The server's policy is a floor, as
    its least mAP is: a request may ask for a comparison, or a smaller tolerance, but
    cannot waive a required one or loosen its tolerance."""
    asked = bool(beat_incumbent)
    if not (policy.require or asked):
        return None
    chosen = policy.tolerance if tolerance is None else tolerance
    if policy.require:
        chosen = min(chosen, policy.tolerance)
    return IncumbentRule(metric=metric or PRIMARY_METRIC, tolerance=chosen)


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    """What a publication was compared on: recorded with it (IncumbentComparison)."""

    candidate_evaluation: str
    incumbent_evaluation: str
    metric: str
    candidate_value: float
    incumbent_value: float
    tolerance: float

    def to_json(self) -> dict[str, Any]:
        """Proto JSON of IncumbentComparison."""
        return {
            "candidate_evaluation": self.candidate_evaluation,
            "incumbent_evaluation": self.incumbent_evaluation,
            "metric": self.metric,
            "candidate_value": self.candidate_value,
            "incumbent_value": self.incumbent_value,
            "tolerance": self.tolerance,
        }


def compare(
    candidate_id: uuid.UUID,
    incumbent_id: uuid.UUID,
    records: Sequence[EvaluationRecord],
    rule: IncumbentRule,
) -> Comparison:
    """The comparison that lets the candidate replace the incumbent; FailedPrecondition
    naming what is missing (an evaluation, a match, the metric) or how far short the
    candidate falls. `records`: the succeeded evaluations of both models."""
    candidate = model_name(candidate_id)
    incumbent = model_name(incumbent_id)
    theirs = [r for r in records if r.model_id == incumbent_id]
    if not theirs:
        raise FailedPrecondition(
            f"the channel's model {incumbent} has no succeeded evaluation to compare "
            f"{candidate} with: evaluate both (EvaluateTrainedModel) on the same images"
        )
    pairs = _pairs(records, incumbent_id=incumbent_id, candidate_id=candidate_id)
    if not pairs:
        benchmark = max(theirs, key=lambda r: (r.create_time, str(r.id)))
        raise FailedPrecondition(
            f"{candidate} has no succeeded evaluation on the images of any evaluation of the "
            f"channel's model {incumbent}; evaluate it on {benchmark.images.describe()}, "
            f"as {benchmark.name} was"
        )
    measured = [(i, c) for i, c in pairs if rule.metric in i.values and rule.metric in c.values]
    if not measured:
        incumbent_eval, candidate_eval = pairs[0]
        lacking = [r.name for r in (candidate_eval, incumbent_eval) if rule.metric not in r.values]
        raise FailedPrecondition(
            f"{rule.metric} is not measured by {' and '.join(lacking)}: compare on another "
            "metric (incumbent_metric)"
        )
    incumbent_eval, candidate_eval = measured[0]
    comparison = Comparison(
        candidate_evaluation=candidate_eval.name,
        incumbent_evaluation=incumbent_eval.name,
        metric=rule.metric,
        candidate_value=candidate_eval.values[rule.metric],
        incumbent_value=incumbent_eval.values[rule.metric],
        tolerance=rule.tolerance,
    )
    worse_by = comparison.incumbent_value - comparison.candidate_value
    if worse_by > rule.tolerance + _EPSILON:
        raise FailedPrecondition(
            f"{candidate} has {rule.metric} {comparison.candidate_value:.4f} "
            f"({candidate_eval.name}), {worse_by:.4f} below the channel's model {incumbent} "
            f"with {comparison.incumbent_value:.4f} ({incumbent_eval.name}) on "
            f"{candidate_eval.images.describe()}; the tolerance is {rule.tolerance:g}, "
            f"so it falls {worse_by - rule.tolerance:.4f} short"
        )
    return comparison


def _pairs(
    records: Sequence[EvaluationRecord], *, incumbent_id: uuid.UUID, candidate_id: uuid.UUID
) -> list[tuple[EvaluationRecord, EvaluationRecord]]:
    """(incumbent's, candidate's) newest evaluations per image set both have, the set
    the incumbent evaluated most recently first."""
    by_set: dict[ImageSet, list[EvaluationRecord]] = {}
    for record in records:
        by_set.setdefault(record.images, []).append(record)
    pairs = []
    for found in by_set.values():
        newest = newest_by_model(found)
        incumbent_eval = newest.get(incumbent_id)
        candidate_eval = newest.get(candidate_id)
        if incumbent_eval is not None and candidate_eval is not None:
            pairs.append((incumbent_eval, candidate_eval))
    pairs.sort(key=lambda p: (p[0].create_time, str(p[0].id)), reverse=True)
    return pairs
