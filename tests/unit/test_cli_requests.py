"""What the CLI sends: unset options stay unset so the server records its own defaults."""

from __future__ import annotations

import uuid
from pathlib import Path

from cli.requests import create_request, dataset_uri, model_name, run_name


def test_unset_options_stay_unset() -> None:
    request = create_request(display_name="r", dataset="s3://b/a.json", architecture="x")
    spec = request.training_run.spec
    for field in ("epochs", "batch_size", "learning_rate", "frozen_stages", "image_size", "seed"):
        assert not spec.HasField(field)
    assert spec.architecture == "x"
    assert request.training_run.base_model == ""
    uuid.UUID(request.request_id)


def test_given_options_are_sent() -> None:
    request = create_request(
        display_name="tune",
        dataset="s3://b/a.json",
        base_model="0d7e",
        epochs=2,
        frozen_stages=-1,
        learning_rate=0.0,
        request_id="7f1e4a57-55c2-4a5e-9d5e-0c3a8f0e8c11",
    )
    spec = request.training_run.spec
    assert (spec.epochs, spec.frozen_stages, spec.learning_rate) == (2, -1, 0.0)
    # Zero and -1 are values, not "unset".
    assert spec.HasField("learning_rate") and spec.HasField("frozen_stages")
    assert request.training_run.base_model == "trainedModels/0d7e"
    assert request.request_id == "7f1e4a57-55c2-4a5e-9d5e-0c3a8f0e8c11"


def test_names_accept_bare_ids() -> None:
    assert run_name("abc") == run_name("trainingRuns/abc") == "trainingRuns/abc"
    assert model_name("abc") == model_name("trainedModels/abc") == "trainedModels/abc"


def test_local_files_become_file_uris(tmp_path: Path) -> None:
    annotations = tmp_path / "annotations.json"
    annotations.write_text("{}")
    assert dataset_uri(str(annotations)) == annotations.resolve().as_uri()
    assert dataset_uri("datasets/a/annotations.json") == "datasets/a/annotations.json"
    assert dataset_uri("s3://bucket/a.json") == "s3://bucket/a.json"


def test_the_image_root_is_sent(tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    folder.mkdir()
    local = create_request(display_name="r", dataset="s3://b/a.json", image_root=str(folder))
    assert local.training_run.spec.image_root == folder.resolve().as_uri()
    remote = create_request(display_name="r", dataset="s3://b/a.json", image_root="s3://b/img/")
    assert remote.training_run.spec.image_root == "s3://b/img/"
    unset = create_request(display_name="r", dataset="s3://b/a.json")
    assert unset.training_run.spec.image_root == ""
