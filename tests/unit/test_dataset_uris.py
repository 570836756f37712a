"""Dataset references the service accepts, and where new artifacts may be configured to go."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.datasets import (
    DatasetUriError,
    parse_dataset_uri,
    parse_image_root,
    resolve_dataset_uri,
)
from shared.settings import Settings
from shared.storage import S3Uri, Storage


def test_s3_and_local_dataset_references() -> None:
    assert parse_dataset_uri("s3://bucket/sets/a%20b/annotations.json") == S3Uri(
        "bucket", "sets/a b/annotations.json"
    )
    assert resolve_dataset_uri("s3://b/x.json", Path("/root")) == S3Uri("b", "x.json")
    assert resolve_dataset_uri("file:///data/x.json", Path("/root")) == Path("/data/x.json")
    assert resolve_dataset_uri("sets/x.json", Path("/root")) == Path("/root/sets/x.json")


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("s3://bucket", "name the annotation file"),
        ("s3://bucket/folder/", "name the annotation file"),
        ("s3:///key.json", "not an s3://bucket/key URI"),
        ("s3://bucket/a/../b.json", "'..'"),
        ("s3://bucket/images.zip", ".json"),
        ("gs://bucket/a.json", "scheme 'gs' is not supported"),
        ("file://host/a.json", "absolute path"),
    ],
)
def test_bad_dataset_references_say_what_is_wrong(uri: str, problem: str) -> None:
    with pytest.raises(DatasetUriError) as caught:
        parse_dataset_uri(uri)
    assert problem in str(caught.value)


def test_image_roots() -> None:
    assert parse_image_root("s3://bucket/images/") == S3Uri("bucket", "images/")
    assert parse_image_root("s3://bucket") == S3Uri("bucket", "")
    assert parse_image_root("/data/images") == Path("/data/images")
    for bad in (
        "s3://bucket/../x/",
        "http://host/images/",
        "../elsewhere/images",
        "/data/set/../../etc",
        "file:///data/%2E%2E/etc",
    ):
        with pytest.raises(DatasetUriError):
            parse_image_root(bad)


def test_the_artifact_store_setting() -> None:
    assert Settings(artifact_store="").artifact_store == ""
    assert Settings(artifact_store="s3://bucket/prefix").artifact_store == "s3://bucket/prefix"
    for bad in ("/data/artifacts", "gs://bucket/x", "s3://"):
        with pytest.raises(ValidationError, match="artifact_store"):
            Settings(artifact_store=bad)


def test_new_artifacts_go_under_the_store_prefix() -> None:
    for store in ("s3://bucket/prefix", "s3://bucket/prefix/"):
        storage = Storage(artifact_root=Path("/srv/artifacts"), artifact_store=store)
        assert storage.remote
        assert storage.artifact_uri("models/m/config.py") == "s3://bucket/prefix/models/m/config.py"
    bucket_only = Storage(artifact_root=Path("/srv/artifacts"), artifact_store="s3://bucket")
    assert bucket_only.artifact_uri("runs/r/") == "s3://bucket/runs/r/"
    local = Storage(artifact_root=Path("/srv/artifacts"))
    assert not local.remote
    assert local.artifact_uri("models/m/config.py") == "file:///srv/artifacts/models/m/config.py"
