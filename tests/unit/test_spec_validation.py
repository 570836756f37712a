"""Validation and defaults of a requested training spec."""

from __future__ import annotations

from typing import Any

import pytest

from services.training_runs.spec import SpecRequest, validate_spec
from shared.errors import InvalidArgument, Violations


def check(spec: SpecRequest, base: str | None = None) -> tuple[dict | None, dict[str, str]]:
    violations = Violations()
    filled = validate_spec(spec, violations, base_architecture=base, prefix="")
    try:
        violations.raise_if_any()
    except InvalidArgument as error:
        return filled, {v.field: v.description for v in error.violations}
    return filled, {}


def check_spec(**fields: Any) -> tuple[dict | None, dict[str, str]]:
    """check() of a spec of a RetinaNet on d/a.json, with `fields` set."""
    base = {"dataset_uri": "d/a.json", "architecture": "retinanet_r18_fpn"}
    return check(SpecRequest(**{**base, **fields}))


def test_defaults_are_filled_and_recorded():
    filled, problems = check_spec()
    assert problems == {}
    assert filled is not None
    assert filled["epochs"] == 12 and filled["batch_size"] == 2
    # From random weights: twice the upstream SGD rate per 16 images, nothing frozen.
    assert filled["learning_rate"] == pytest.approx(0.02 * 2 / 16)
    assert filled["frozen_stages"] == -1 and filled["optimizer"] == "SGD"
    assert isinstance(filled["seed"], int) and filled["seed"] >= 0


def test_every_bad_field_is_reported_at_once():
    _, problems = check(
        SpecRequest(
            dataset_uri="gs://bucket/a.json",
            architecture="",
            epochs=0,
            batch_size=65,
            learning_rate=-1.0,
            frozen_stages=5,
            image_size=8,
            val_fraction=0.9,
            seed=-1,
        )
    )
    assert set(problems) == {
        "dataset_uri",
        "architecture",
        "epochs",
        "batch_size",
        "learning_rate",
        "frozen_stages",
        "image_size",
        "val_fraction",
        "seed",
    }


def test_a_fine_tune_keeps_the_base_architecture():
    filled, problems = check(SpecRequest(dataset_uri="a.json"), base="faster_rcnn_r50_fpn")
    assert problems == {} and filled is not None
    assert filled["architecture"] == "faster_rcnn_r50_fpn"
    _, problems = check(
        SpecRequest(dataset_uri="a.json", architecture="retinanet_r18_fpn"),
        base="faster_rcnn_r50_fpn",
    )
    assert "architecture" in problems


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.0, 1.5])
def test_learning_rate_must_be_a_sane_positive_number(lr):
    _, problems = check_spec(dataset_uri="a.json", learning_rate=lr)
    assert "learning_rate" in problems


def test_hyperparameter_defaults_are_recorded():
    filled, problems = check_spec()
    assert problems == {} and filled is not None
    assert filled["optimizer"] == "SGD" and filled["augment"] is True
    assert filled["val_interval"] == 1 and filled["early_stopping_patience"] == 0
    # Depend on the run's length and the worker's device: left to the worker.
    assert "warmup_iterations" not in filled and "mixed_precision" not in filled


def test_hyperparameters_are_bounded():
    _, problems = check_spec(
        epochs=4,
        warmup_iterations=-1,
        val_interval=5,
        early_stopping_patience=101,
        mixed_precision=True,
        device="CPU",
    )
    assert set(problems) == {
        "warmup_iterations",
        "val_interval",
        "early_stopping_patience",
        "mixed_precision",
    }
    filled, problems = check_spec(optimizer="ADAMW", augment=False, warmup_iterations=0)
    assert problems == {} and filled is not None
    assert (filled["optimizer"], filled["augment"], filled["warmup_iterations"]) == (
        "ADAMW",
        False,
        0,
    )


def test_test_fraction_defaults_to_no_test_split():
    filled, problems = check_spec()
    assert problems == {} and filled is not None
    assert filled["test_fraction"] == 0.0
    filled, problems = check_spec(val_fraction=0.5, test_fraction=0.3)
    assert problems == {} and filled is not None
    assert (filled["val_fraction"], filled["test_fraction"]) == (0.5, 0.3)


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction", "needle"),
    [
        (None, 0.01, "must be 0 (no test split) or between 0.05 and 0.5, got 0.01"),
        (None, 0.6, "between 0.05 and 0.5"),
        (None, -0.1, "between 0.05 and 0.5"),
        (None, float("nan"), "between 0.05 and 0.5"),
        (0.5, 0.35, "val_fraction + test_fraction must be at most 0.8"),
    ],
)
def test_test_fraction_is_bounded_and_leaves_images_to_train_on(
    val_fraction, test_fraction, needle
):
    _, problems = check_spec(val_fraction=val_fraction, test_fraction=test_fraction)
    assert set(problems) == {"test_fraction"}
    assert needle in problems["test_fraction"]


def test_an_invalid_val_fraction_is_reported_once():
    _, problems = check_spec(val_fraction=0.9, test_fraction=0.3)
    assert set(problems) == {"val_fraction"}


@pytest.mark.parametrize(
    ("dataset_uri", "image_root", "field"),
    [
        ("sets/../../etc/a.json", "", "dataset_uri"),
        ("sets/a.json", "../other/images", "image_root"),
        ("sets/a.json", "s3://bucket/set/../other/", "image_root"),
    ],
)
def test_a_dataset_cannot_climb_out_of_where_it_lives(
    dataset_uri: str, image_root: str, field: str
) -> None:
    _, problems = check_spec(dataset_uri=dataset_uri, image_root=image_root)
    assert list(problems) == [field] and "'..'" in problems[field]


def test_deterministic_is_recorded_with_the_seed():
    filled, _ = check_spec()
    assert filled is not None and filled["deterministic"] is False
    filled, _ = check_spec(deterministic=True, seed=7)
    assert filled is not None and (filled["deterministic"], filled["seed"]) == (True, 7)
