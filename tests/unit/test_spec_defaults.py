"""One definition of what an unset spec field becomes, for the service and the worker."""

from __future__ import annotations

import dataclasses

import pytest

from services.training_runs.spec import SpecRequest, validate_spec
from shared import catalog, spec_defaults
from shared.errors import Violations
from shared.proto.raven.training.v1 import training_run_pb2
from trainer_worker.plan import TrainingPlan, plan_of

# Every field of the plan but the worker's own (its data loading) and those left open.
RECORDED_PLAN_FIELDS = [
    f.name
    for f in dataclasses.fields(TrainingPlan)
    if f.name not in {"num_workers", "pin_memory", *spec_defaults.OPEN_FIELDS}
]


@pytest.mark.parametrize("fine_tune", [False, True])
@pytest.mark.parametrize("architecture", sorted(catalog.ARCHITECTURES))
def test_the_worker_completes_a_spec_as_the_service_records_it(
    architecture: str, fine_tune: bool
) -> None:
    recorded = validate_spec(
        SpecRequest(dataset_uri="d/a.json", architecture=architecture, seed=7),
        Violations(),
        base_architecture=architecture if fine_tune else None,
    )
    assert recorded is not None
    plan = plan_of(
        training_run_pb2.TrainingSpec(dataset_uri="d/a.json", architecture=architecture, seed=7),
        fine_tune=fine_tune,
    )
    for name in RECORDED_PLAN_FIELDS:
        assert getattr(plan, name) == recorded[name], name
    assert plan.warmup_iterations is None and "warmup_iterations" not in recorded


def test_an_unset_seed_is_drawn_and_a_set_one_kept() -> None:
    drawn = spec_defaults.complete(
        {"architecture": "rtmdet_tiny"}, fine_tune=False, new_seed=lambda: 41
    )
    assert drawn["seed"] == 41
    kept = spec_defaults.complete({"architecture": "rtmdet_tiny", "seed": 0}, fine_tune=False)
    assert kept["seed"] == 0
    assert (
        0
        <= spec_defaults.complete({"architecture": "rtmdet_tiny"}, fine_tune=False)["seed"]
        < spec_defaults.SEED_LIMIT
    )


def test_an_unknown_architecture_is_refused() -> None:
    with pytest.raises(spec_defaults.UnknownArchitecture):
        spec_defaults.complete({"architecture": "yolo"}, fine_tune=False)
