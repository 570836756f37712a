"""The publication gate against a channel's model, the comparison table of models and
the choice of a downloaded artifact: the pure decisions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.trained_models import artifact_choice, comparison, incumbent
from services.trained_models.comparison import EvaluationRecord, ImageSet
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, Violations

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CANDIDATE, INCUMBENT, THIRD = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
VAL = ImageSet("fp-data", "val", "img-a")
VAL_OTHER_SEED = ImageSet("fp-data", "val", "img-b")
TEST = ImageSet("fp-data", "test", "img-c")
RULE = incumbent.IncumbentRule(metric="coco/bbox_mAP", tolerance=0.0)


def record(
    model: uuid.UUID,
    images: ImageSet,
    minutes: int,
    map_: float | None = None,
    **values: float,
) -> EvaluationRecord:
    found = dict(values)
    if map_ is not None:
        found["coco/bbox_mAP"] = map_
    return EvaluationRecord(
        id=uuid.uuid4(),
        model_id=model,
        images=images,
        image_count=8,
        create_time=T0 + timedelta(minutes=minutes),
        values=found,
    )


# Which comparison a publication needs


def test_no_comparison_unless_asked_or_required() -> None:
    off = incumbent.IncumbentPolicy()
    assert incumbent.rule_for(off, beat_incumbent=None, metric="", tolerance=None) is None
    assert incumbent.rule_for(off, beat_incumbent=False, metric="", tolerance=0.1) is None
    asked = incumbent.rule_for(off, beat_incumbent=True, metric="", tolerance=None)
    assert asked == incumbent.IncumbentRule(metric="coco/bbox_mAP", tolerance=0.0)
    loose = incumbent.rule_for(off, beat_incumbent=True, metric="AP/tire", tolerance=0.05)
    assert loose == incumbent.IncumbentRule(metric="AP/tire", tolerance=0.05)


def test_the_server_policy_is_a_floor_a_request_cannot_waive_or_loosen() -> None:
    required = incumbent.IncumbentPolicy(require=True, tolerance=0.02)
    waived = incumbent.rule_for(required, beat_incumbent=False, metric="", tolerance=None)
    assert waived == incumbent.IncumbentRule(metric="coco/bbox_mAP", tolerance=0.02)
    looser = incumbent.rule_for(required, beat_incumbent=True, metric="", tolerance=0.5)
    assert looser is not None and looser.tolerance == 0.02
    stricter = incumbent.rule_for(required, beat_incumbent=None, metric="", tolerance=0.01)
    assert stricter is not None and stricter.tolerance == 0.01


@pytest.mark.parametrize(
    ("metric", "tolerance", "field"),
    [
        ("bbox_mAP", None, "incumbent_metric"),
        ("AP/", None, "incumbent_metric"),
        ("coco/loss", None, "incumbent_metric"),
        ("", -0.01, "incumbent_tolerance"),
        ("", 1.5, "incumbent_tolerance"),
        ("", float("nan"), "incumbent_tolerance"),
    ],
)
def test_a_bad_metric_or_tolerance_is_named(
    metric: str, tolerance: float | None, field: str
) -> None:
    violations = Violations()
    incumbent.validate(violations, metric=metric, tolerance=tolerance)
    with pytest.raises(InvalidArgument) as caught:
        violations.raise_if_any()
    assert [v.field for v in caught.value.violations] == [field]


def test_good_metrics_and_tolerances_pass() -> None:
    for metric, tolerance in [("", None), ("coco/bbox_mAP_50", 0.0), ("AP/tire", 1.0)]:
        violations = Violations()
        incumbent.validate(violations, metric=metric, tolerance=tolerance)
        violations.raise_if_any()


# The decision


def test_a_candidate_as_good_as_the_incumbent_passes_and_the_pair_is_recorded() -> None:
    theirs = record(INCUMBENT, VAL, 1, 0.4)
    ours = record(CANDIDATE, VAL, 2, 0.4)
    found = incumbent.compare(CANDIDATE, INCUMBENT, [theirs, ours], RULE)
    assert found.to_json() == {
        "candidate_evaluation": ours.name,
        "incumbent_evaluation": theirs.name,
        "metric": "coco/bbox_mAP",
        "candidate_value": 0.4,
        "incumbent_value": 0.4,
        "tolerance": 0.0,
    }
    assert ours.name == f"trainedModels/{CANDIDATE}/evaluations/{ours.id}"


def test_a_worse_candidate_is_refused_with_how_far_short_it_falls() -> None:
    records = [record(INCUMBENT, VAL, 1, 0.40), record(CANDIDATE, VAL, 2, 0.35)]
    rule = incumbent.IncumbentRule(metric="coco/bbox_mAP", tolerance=0.02)
    with pytest.raises(FailedPrecondition) as caught:
        incumbent.compare(CANDIDATE, INCUMBENT, records, rule)
    message = str(caught.value)
    assert "0.3500" in message and "0.4000" in message
    assert "0.0500 below" in message and "falls 0.0300 short" in message
    assert f"trainedModels/{INCUMBENT}" in message


def test_within_the_tolerance_passes_and_just_beyond_it_does_not() -> None:
    records = [record(INCUMBENT, VAL, 1, 0.40), record(CANDIDATE, VAL, 2, 0.38)]
    ok = incumbent.compare(
        CANDIDATE, INCUMBENT, records, incumbent.IncumbentRule(metric=RULE.metric, tolerance=0.02)
    )
    assert ok.candidate_value == 0.38
    with pytest.raises(FailedPrecondition, match="short"):
        incumbent.compare(
            CANDIDATE,
            INCUMBENT,
            records,
            incumbent.IncumbentRule(metric=RULE.metric, tolerance=0.019),
        )


def test_an_incumbent_never_evaluated_blocks_and_says_so() -> None:
    with pytest.raises(FailedPrecondition, match="has no succeeded evaluation to compare"):
        incumbent.compare(CANDIDATE, INCUMBENT, [record(CANDIDATE, VAL, 1, 0.9)], RULE)


def test_evaluations_on_other_images_do_not_count() -> None:
    """Same dataset and split name, other images (another seed's val split): no match,
    and the message names the incumbent's evaluation to match."""
    theirs = record(INCUMBENT, VAL, 1, 0.4)
    records = [theirs, record(CANDIDATE, VAL_OTHER_SEED, 2, 0.9), record(CANDIDATE, TEST, 3, 0.9)]
    with pytest.raises(FailedPrecondition) as caught:
        incumbent.compare(CANDIDATE, INCUMBENT, records, RULE)
    message = str(caught.value)
    assert "no succeeded evaluation on the images" in message
    assert theirs.name in message and "val split of dataset fp-data" in message


def test_the_newest_evaluations_decide_not_an_old_flattering_one() -> None:
    records = [
        record(INCUMBENT, VAL, 1, 0.30),
        record(CANDIDATE, VAL, 2, 0.50),  # an old, better result of the candidate
        record(CANDIDATE, VAL, 5, 0.20),  # its newest
    ]
    with pytest.raises(FailedPrecondition, match=r"0\.2000"):
        incumbent.compare(CANDIDATE, INCUMBENT, records, RULE)


def test_the_image_set_the_incumbent_evaluated_last_is_the_benchmark() -> None:
    old = record(INCUMBENT, TEST, 1, 0.10)
    new = record(INCUMBENT, VAL, 9, 0.60)
    records = [old, new, record(CANDIDATE, TEST, 2, 0.50), record(CANDIDATE, VAL, 3, 0.55)]
    with pytest.raises(FailedPrecondition) as caught:
        incumbent.compare(CANDIDATE, INCUMBENT, records, RULE)
    assert new.name in str(caught.value)
    # Without the newer benchmark, the older one decides.
    passed = incumbent.compare(CANDIDATE, INCUMBENT, [old, records[2], records[3]], RULE)
    assert passed.incumbent_evaluation == old.name


def test_a_metric_neither_side_measured_is_named() -> None:
    records = [record(INCUMBENT, VAL, 1, 0.4), record(CANDIDATE, VAL, 2, 0.5, **{"AP/tire": 0.2})]
    rule = incumbent.IncumbentRule(metric="AP/tire", tolerance=0.0)
    with pytest.raises(FailedPrecondition, match="AP/tire is not measured by trainedModels/"):
        incumbent.compare(CANDIDATE, INCUMBENT, records, rule)


# Metric values and the comparison table


def test_metric_values_leave_out_what_coco_could_not_measure() -> None:
    stored = {
        "split": "val",
        "metrics": {"coco/bbox_mAP": 0.3, "coco/bbox_mAP_s": -1.0},
        "per_class_ap": {"tire": 0.5, "dump": -1.0},
    }
    assert comparison.metric_values(stored) == {"coco/bbox_mAP": 0.3, "AP/tire": 0.5}
    assert comparison.metric_values(None) == {}


def test_the_table_takes_every_models_newest_evaluation_on_one_common_image_set() -> None:
    records = [
        record(CANDIDATE, VAL, 1, 0.1, **{"AP/tire": 0.2, "coco/bbox_mAP_50": 0.3}),
        record(CANDIDATE, VAL, 4, 0.2, **{"AP/dump": 0.1}),
        record(INCUMBENT, VAL, 2, 0.3, **{"coco/AR@100": 0.5, "AP/tire": 0.6}),
        record(INCUMBENT, TEST, 9, 0.9),  # the candidate has no test evaluation
    ]
    found = comparison.table([INCUMBENT, CANDIDATE], records)
    assert found.images == VAL
    assert [(m, r.id) for m, r in found.rows] == [
        (INCUMBENT, records[2].id),
        (CANDIDATE, records[1].id),
    ]
    assert found.metrics == ["coco/bbox_mAP", "coco/AR@100", "AP/tire", "AP/dump"]


def test_the_table_picks_the_most_recent_common_set_and_honours_the_filters() -> None:
    records = [
        record(CANDIDATE, VAL, 1, 0.1),
        record(INCUMBENT, VAL, 2, 0.2),
        record(CANDIDATE, TEST, 3, 0.3),
        record(INCUMBENT, TEST, 4, 0.4),
    ]
    assert comparison.table([CANDIDATE, INCUMBENT], records).images == TEST
    assert comparison.table([CANDIDATE, INCUMBENT], records, split="val").images == VAL
    with pytest.raises(FailedPrecondition, match="dataset fingerprint 'other'"):
        comparison.table([CANDIDATE, INCUMBENT], records, dataset_fingerprint="other")


def test_the_table_names_the_models_without_an_evaluation() -> None:
    records = [record(CANDIDATE, VAL, 1, 0.1), record(INCUMBENT, VAL, 2, 0.2)]
    with pytest.raises(FailedPrecondition) as caught:
        comparison.table([CANDIDATE, INCUMBENT, THIRD], records)
    assert f"trainedModels/{THIRD}" in str(caught.value)
    assert f"trainedModels/{CANDIDATE}" not in str(caught.value)


def test_the_table_refuses_models_evaluated_only_on_different_images() -> None:
    records = [record(CANDIDATE, VAL, 1, 0.1), record(INCUMBENT, VAL_OTHER_SEED, 2, 0.2)]
    with pytest.raises(FailedPrecondition, match="on no one set of images"):
        comparison.table([CANDIDATE, INCUMBENT], records)


# The artifact a download means


ARTIFACTS = [
    {"kind": "checkpoint", "uri": "file:///a/models/x/epoch_3.pth", "name": ""},
    {"kind": "sample", "uri": "s3://b/e/worst-1.png", "name": "worst-1.png"},
    {"kind": "sample", "uri": "s3://b/e/best-1.png", "name": "best-1.png"},
    {"kind": "evaluation", "uri": "s3://b/e/evaluation.json", "name": "evaluation.json"},
]


def test_an_artifact_is_chosen_by_name_or_by_its_kind_when_it_is_the_only_one() -> None:
    assert artifact_choice.choose(ARTIFACTS, "best-1.png", "p")["uri"].endswith("best-1.png")
    assert artifact_choice.choose(ARTIFACTS, "evaluation", "p")["kind"] == "evaluation"
    # One recorded without a name goes by its file's name.
    assert artifact_choice.choose(ARTIFACTS, "epoch_3.pth", "p")["kind"] == "checkpoint"


def test_an_ambiguous_kind_names_the_candidates_and_an_unknown_one_is_not_found() -> None:
    with pytest.raises(InvalidArgument) as caught:
        artifact_choice.choose(ARTIFACTS, "sample", "trainedModels/m")
    (violation,) = caught.value.violations
    assert violation.field == "artifact"
    assert "best-1.png, worst-1.png" in violation.description
    with pytest.raises(NotFound, match="'plot'"):
        artifact_choice.choose(ARTIFACTS, "plot", "trainedModels/m")


def test_parents_are_parsed_and_anything_else_is_named() -> None:
    model, evaluation = uuid.uuid4(), uuid.uuid4()
    parsed = artifact_choice.parse_parent(f"trainedModels/{model}/evaluations/{evaluation}")
    assert (parsed.kind, parsed.id, parsed.model_id) == ("evaluation", evaluation, model)
    assert parsed.name == f"trainedModels/{model}/evaluations/{evaluation}"
    assert artifact_choice.parse_parent(f"trainingRuns/{model}").kind == "run"
    assert artifact_choice.parse_parent(f"trainedModels/{model}").kind == "model"
    for bad in ["", f"trainedModels/{model}/evaluations/", "datasets/x", f"trainingRuns/{model}/x"]:
        with pytest.raises(InvalidArgument) as caught:
            artifact_choice.parse_parent(bad)
        assert caught.value.violations[0].field == "parent"
