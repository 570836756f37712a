from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from shared.errors import InvalidArgument
from shared.limits import quote
from shared.names import TRAINING_RUNS, parse_name
from shared.proto.raven.training.v1 import trained_model_pb2, training_run_pb2
from shared.request_guard import check_request

pb = training_run_pb2


def fields(message) -> dict[str, str]:
    found: dict[str, str] = {}
    for violation in check_request(message):
        found[violation.field] = "; ".join(
            filter(None, [found.get(violation.field), violation.description])
        )
    return found


def test_a_valid_request_passes():
    request = pb.CreateTrainingRunRequest(
        training_run=pb.TrainingRun(
            display_name="run",
            labels={"team": "vision"},
            spec=pb.TrainingSpec(dataset_uri="d/a.json", device=pb.TrainingSpec.GPU),
        )
    )
    assert fields(request) == {}


def test_nul_bytes_unknown_enums_and_non_finite_numbers_are_named():
    request = pb.CreateTrainingRunRequest(
        training_run=pb.TrainingRun(
            display_name="a\x00b",
            spec=pb.TrainingSpec(dataset_uri="d.json", device=99, optimizer=-1),  # type: ignore[arg-type]
        )
    )
    request.training_run.spec.learning_rate = float("nan")
    found = fields(request)
    assert "NUL" in found["training_run.display_name"]
    assert "unknown value 99" in found["training_run.spec.device"]
    assert "unknown value -1" in found["training_run.spec.optimizer"]
    assert "finite" in found["training_run.spec.learning_rate"]
    assert "unknown value 99" in fields(pb.ListTrainingRunsRequest(states=[1, 99]))["states"]  # type: ignore[list-item]


def test_timestamps_out_of_range_are_refused():
    found = fields(
        pb.ListTrainingRunsRequest(
            created_after=Timestamp(seconds=2**62), created_before=Timestamp(nanos=-1)
        )
    )
    assert set(found) == {"created_after", "created_before"}


def test_strings_and_labels_are_bounded_and_quoted_briefly():
    huge = "x" * 5_000_000
    request = pb.UpdateTrainingRunRequest(
        training_run=pb.TrainingRun(
            name="trainingRuns/" + huge,
            labels={"": "v", huge: "v", "ok": "y" * 257},
            spec=pb.TrainingSpec(image_root="i" * 2049),
        )
    )
    found = fields(request)
    assert "at most 128 characters" in found["training_run.name"]
    assert "at most 2048 characters" in found["training_run.spec.image_root"]
    assert "key" in found["training_run.labels"]
    assert all(len(v.description) < 300 for v in check_request(request))
    many = pb.UpdateTrainingRunRequest(
        training_run=pb.TrainingRun(labels={f"k{i}": "v" for i in range(10_000)})
    )
    assert "at most 64 labels" in fields(many)["training_run.labels"]


def test_what_the_server_sets_is_not_checked_when_a_resource_is_sent_back():
    run = pb.TrainingRun(name="trainingRuns/x", display_name="ok")
    run.failure.message = "m" * 50_000
    run.state = 99  # type: ignore[assignment]
    assert fields(pb.UpdateTrainingRunRequest(training_run=run)) == {}
    model = trained_model_pb2.TrainedModel(name="trainedModels/x", dataset_uri="d" * 5000)
    assert fields(trained_model_pb2.UpdateTrainedModelRequest(trained_model=model)) == {}


def test_error_texts_quote_a_short_prefix_of_a_bad_value():
    with pytest.raises(InvalidArgument) as caught:
        parse_name("trainingRuns/" + "x" * 1_000_000, TRAINING_RUNS)
    description = caught.value.violations[0].description
    assert len(description) < 200 and "1000013 characters" in description
    assert quote("short") == "'short'"
