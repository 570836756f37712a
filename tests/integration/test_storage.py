"""Both storage backends against real files and a real S3 API (moto's server on loopback),
and what the worker fetches from S3: datasets and verified checkpoints (a job whose base
model's object is missing or changed fails before any training)."""

from __future__ import annotations

import hashlib
import json
import socket
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest

from shared.infra import Infrastructure
from shared.messaging import Subjects, ensure_streams
from shared.proto.raven.training.v1 import common_pb2, training_run_pb2, worker_pb2
from shared.storage import (
    LocalStore,
    ObjectNotFound,
    S3Store,
    Storage,
    StorageError,
    UnsupportedUri,
    get_files,
    sha256_of,
)
from tests.images import encoded, write_image
from tests.s3 import S3Server
from trainer_worker import remote
from trainer_worker.dataset import DatasetError, prepare_dataset
from trainer_worker.pipeline import JobControl, JobOutcome, WorkerEnvironment, execute_job
from trainer_worker.publisher import EventPublisher, JobIdentity

pytestmark = pytest.mark.timeout(60)

DATA = b"raven" * 300_000  # 1.5 MB: more than one chunk


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def prefix() -> str:
    return f"storage-{uuid.uuid4().hex[:8]}/"


def test_local_store_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)
    uri = (store.root / "models" / "m1" / "checkpoint.pth").as_uri()

    stored = store.put_file(source, uri)
    assert (stored.uri, stored.size_bytes, stored.sha256) == (uri, len(DATA), digest(DATA))
    assert store.size(uri) == len(DATA)
    assert store.size("models/m1/checkpoint.pth") == len(DATA), "root-relative paths too"
    assert b"".join(store.chunks(uri)) == DATA
    assert b"".join(store.chunks(uri, limit=10)) == DATA[:10]
    copy = store.get_file(uri, tmp_path / "out" / "copy.pth")
    assert copy.sha256 == digest(DATA) and (tmp_path / "out" / "copy.pth").read_bytes() == DATA
    assert sha256_of(store, uri).sha256 == digest(DATA)

    store.delete([uri])
    assert store.size(uri) is None
    assert not (store.root / "models" / "m1").exists(), "an emptied folder goes too"
    with pytest.raises(ObjectNotFound):
        store.get_file(uri, tmp_path / "gone")
    with pytest.raises(ObjectNotFound):
        store.get_file(store.root.as_uri(), tmp_path / "folder")


def test_local_store_refuses_what_is_outside_its_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    for uri in (outside.as_uri(), "../secret.txt", "models/../../secret.txt", "s3://b/k"):
        with pytest.raises(UnsupportedUri):
            store.size(uri)
        with pytest.raises(UnsupportedUri):
            store.delete([uri])
    with pytest.raises(UnsupportedUri):
        store.put_file(outside, (tmp_path / "elsewhere.txt").as_uri())
    with pytest.raises(UnsupportedUri):
        store.delete_prefix(store.root.as_uri())
    assert outside.read_text() == "not yours"


def test_s3_store_round_trip(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    store = S3Store(endpoint_url=s3.endpoint)
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)
    uri = s3.uri(prefix + "run/epoch_1.pth")

    stored = store.put_file(source, uri)
    assert (stored.uri, stored.size_bytes, stored.sha256) == (uri, len(DATA), digest(DATA))
    assert s3.get(prefix + "run/epoch_1.pth") == DATA, "the bytes are really in the bucket"
    assert store.size(uri) == len(DATA)
    assert store.size(s3.uri(prefix + "nothing-here")) is None
    assert b"".join(store.chunks(uri)) == DATA
    assert b"".join(store.chunks(uri, limit=1234)) == DATA[:1234]
    assert list(store.chunks(uri, limit=0)) == []
    target = tmp_path / "down" / "copy.pth"
    assert store.get_file(uri, target).sha256 == digest(DATA)
    assert target.read_bytes() == DATA
    assert sha256_of(store, uri).size_bytes == len(DATA)

    with pytest.raises(ObjectNotFound) as missing:
        store.get_file(s3.uri(prefix + "nothing-here"), tmp_path / "never")
    assert prefix + "nothing-here" in str(missing.value)
    assert not (tmp_path / "never").exists(), "nothing half-written is left"

    s3.put(prefix + "run/epoch_2.pth", b"2")
    s3.put(prefix + "other/keep.txt", b"k")
    s3.put(prefix + "run-sibling/keep.txt", b"k")
    store.delete([uri])
    assert s3.keys(prefix + "run/") == [prefix + "run/epoch_2.pth"]
    store.delete_prefix(s3.uri(prefix + "run"))
    assert s3.keys(prefix) == [prefix + "other/keep.txt", prefix + "run-sibling/keep.txt"]
    with pytest.raises(UnsupportedUri):
        store.delete_prefix(s3.uri(""))


def test_s3_errors_name_the_uri(s3: S3Server, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = S3Store(endpoint_url=f"http://127.0.0.1:{closed_port}")
    uri = s3.uri("anything.json")
    with pytest.raises(StorageError) as caught:
        unreachable.size(uri)
    assert uri in str(caught.value) and not isinstance(caught.value, ObjectNotFound)

    store = S3Store(endpoint_url=s3.endpoint)
    assert store.size("s3://no-such-bucket-here/a.json") is None
    with pytest.raises(UnsupportedUri):
        store.size("s3://bucket-only")
    with pytest.raises(UnsupportedUri):
        store.get_file("file:///etc/hostname", tmp_path / "x")


def test_parallel_downloads_report_the_missing(s3: S3Server, tmp_path: Path, prefix: str):
    store = S3Store(endpoint_url=s3.endpoint)
    names = [f"img/{i}.png" for i in range(40)]
    for i, name in enumerate(names):
        s3.put(prefix + name, bytes([i]) * (i + 1))
    transfers = [(s3.uri(prefix + n), tmp_path / n) for n in [*names, "img/absent.png"]]
    assert get_files(store, transfers) == [s3.uri(prefix + "img/absent.png")]
    assert all((tmp_path / n).read_bytes() == bytes([i]) * (i + 1) for i, n in enumerate(names))


def test_the_router_sends_new_artifacts_to_the_configured_store(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    source = tmp_path / "config.py"
    source.write_text("model = dict()\n")
    local = Storage(artifact_root=tmp_path / "root")
    assert not local.remote
    stored = local.put_artifact(source, "models/r1/config.py")
    assert stored.uri == (tmp_path / "root" / "models" / "r1" / "config.py").resolve().as_uri()

    remote_store = Storage(
        artifact_root=tmp_path / "root",
        artifact_store=s3.uri(prefix.rstrip("/")),
        s3=S3Store(endpoint_url=s3.endpoint),
    )
    assert remote_store.remote
    stored = remote_store.put_artifact(source, "models/r1/config.py")
    assert stored.uri == s3.uri(prefix + "models/r1/config.py")
    assert remote_store.size(stored.uri) == source.stat().st_size
    assert remote_store.size(local.artifact_uri("models/r1/config.py")) is not None
    elsewhere = s3.put(f"not-{prefix}data.json", b"someone's")
    remote_store.delete([stored.uri, local.artifact_uri("models/r1/config.py"), elsewhere])
    assert s3.keys(prefix) == [] and not (tmp_path / "root" / "models" / "r1").exists()
    assert s3.get(f"not-{prefix}data.json") == b"someone's", "outside the store: left alone"
    with pytest.raises(UnsupportedUri):
        remote_store.size("gs://bucket/x")


# What the worker fetches


def coco(images: int = 6) -> dict[str, Any]:
    return {
        "images": [
            {"id": i, "file_name": f"img/{i}.jpg", "width": 100, "height": 80}
            for i in range(1, images + 1)
        ],
        "annotations": [
            {"id": 100 + i, "image_id": i, "category_id": 1 + i % 2, "bbox": [10, 10, 20, 30]}
            for i in range(1, images + 1)
        ],
        "categories": [{"id": 1, "name": "dump"}, {"id": 2, "name": "tire"}],
    }


def image_bytes(image_id: int) -> bytes:
    """A real 100x80 image, different for each id."""
    return encoded(100, 80, noise=image_id)


def upload_dataset(s3: S3Server, prefix: str, document: dict[str, Any]) -> str:
    for image in document["images"]:
        s3.put(prefix + image["file_name"], image_bytes(image["id"]))
    return s3.put(prefix + "annotations.json", json.dumps(document).encode())


def fetch(s3: S3Server, tmp_path: Path, dataset_uri: str, image_root: str = ""):
    return remote.fetch_dataset(
        dataset_uri=dataset_uri,
        image_root=image_root,
        folder=tmp_path / "source",
        storage=Storage(artifact_root=tmp_path, s3=S3Store(endpoint_url=s3.endpoint)),
        artifact_root=tmp_path,
    )


def test_an_s3_dataset_is_fetched_with_the_images_it_lists(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    uri = upload_dataset(s3, prefix, coco())
    s3.put(prefix + "img/unlisted.jpg", b"not in the annotation file")

    local = fetch(s3, tmp_path, uri)
    assert local.annotation_path.read_bytes() == s3.get(prefix + "annotations.json")
    assert local.image_root is not None
    fetched = sorted(
        p.relative_to(local.image_root).as_posix() for p in local.image_root.rglob("*.*")
    )
    assert fetched == [f"img/{i}.jpg" for i in range(1, 7)], "only the listed images"

    prepared = prepare_dataset(
        annotation_path=local.annotation_path,
        image_root=local.image_root,
        out_dir=tmp_path / "prepared",
        val_fraction=0.3,
        seed=1,
    )
    assert prepared.image_count == 6 and prepared.classes == ("dump", "tire")


def test_an_image_root_on_s3_serves_a_local_annotation_file(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    document = coco()
    upload_dataset(s3, prefix + "pictures/", document)
    annotation = tmp_path / "annotations.json"
    annotation.write_text(json.dumps(document))

    local = fetch(s3, tmp_path, annotation.as_uri(), image_root=s3.uri(prefix + "pictures"))
    assert local.annotation_path == annotation
    assert local.image_root is not None and (
        local.image_root / "img" / "3.jpg"
    ).read_bytes() == image_bytes(3)


def test_missing_s3_objects_are_dataset_errors(s3: S3Server, tmp_path: Path, prefix: str) -> None:
    with pytest.raises(DatasetError) as caught:
        fetch(s3, tmp_path, s3.uri(prefix + "nowhere/annotations.json"))
    assert caught.value.reason == "dataset_unreadable"
    assert "nowhere/annotations.json does not exist" in caught.value.message

    document = coco()
    uri = upload_dataset(s3, prefix, document)
    s3.client().delete_object(Bucket=s3.bucket, Key=prefix + "img/4.jpg")
    with pytest.raises(DatasetError) as caught:
        fetch(s3, tmp_path, uri)
    assert caught.value.reason == "dataset_invalid"
    assert "1 images are missing under" in caught.value.message
    assert "img/4.jpg" in caught.value.message and "set image_root" in caught.value.message

    document["images"][0]["file_name"] = "../../escape.jpg"
    uri = s3.put(prefix + "escaping.json", json.dumps(document).encode())
    with pytest.raises(DatasetError) as caught:
        fetch(s3, tmp_path, uri)
    assert caught.value.reason == "dataset_invalid" and "../../escape.jpg" in caught.value.message
    assert not (tmp_path / "escape.jpg").exists()


@pytest.mark.parametrize(
    "name",
    ["../escape.jpg", "img/../../escape.jpg", "/abs/escape.jpg", "./", "img/\0.jpg"],
)
def test_s3_names_cannot_leave_the_prefix(
    s3: S3Server, tmp_path: Path, prefix: str, name: str
) -> None:
    """Refused before anything is written: no annotation copy, no image folder, no key
    outside the prefix read."""
    document = coco()
    upload_dataset(s3, prefix + "set/", document)
    s3.put(prefix + "escape.jpg", image_bytes(1))
    document["images"][1]["file_name"] = name
    uri = s3.put(prefix + "set/escaping.json", json.dumps(document).encode())
    with pytest.raises(DatasetError) as caught:
        fetch(s3, tmp_path, uri)
    assert caught.value.reason == "dataset_invalid"
    assert "1 images have a file_name that is not a relative path" in caught.value.message
    assert not (tmp_path / "source").exists(), "nothing is written before the refusal"
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    # The same names with a local annotation file and the images on S3.
    local = tmp_path / "local" / "annotations.json"
    local.parent.mkdir()
    local.write_text(json.dumps(document))
    with pytest.raises(DatasetError) as caught:
        fetch(s3, tmp_path, local.as_uri(), image_root=s3.uri(prefix + "set/"))
    assert caught.value.reason == "dataset_invalid"
    assert not (tmp_path / "source").exists()


def test_a_checkpoint_is_used_only_with_its_recorded_sha256(
    s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    storage = Storage(artifact_root=tmp_path, s3=S3Store(endpoint_url=s3.endpoint))
    uri = s3.put(prefix + "models/m/checkpoint.pth", DATA)

    path = remote.fetch_verified(storage, uri, sha256=digest(DATA), folder=tmp_path / "inputs")
    assert path.read_bytes() == DATA and path.name == "checkpoint.pth"

    with pytest.raises(remote.CorruptObject) as caught:
        remote.fetch_verified(storage, uri, sha256=digest(b"other"), folder=tmp_path / "bad")
    assert digest(DATA) in str(caught.value)
    assert [p for p in (tmp_path / "bad").rglob("*") if p.is_file()] == [], "nothing is kept"
    with pytest.raises(remote.CorruptObject):
        remote.fetch_verified(storage, uri, sha256="../../x", folder=tmp_path / "bad")
    with pytest.raises(ObjectNotFound):
        remote.fetch_verified(
            storage, s3.uri(prefix + "gone.pth"), sha256=digest(DATA), folder=tmp_path / "bad"
        )


async def test_a_base_model_in_s3_is_verified_before_training(
    infrastructure: Infrastructure, s3: S3Server, tmp_path: Path, prefix: str
) -> None:
    annotation = tmp_path / "data" / "annotations.json"
    document = coco()
    for image in document["images"]:
        write_image(tmp_path / "data" / image["file_name"], 100, 80, noise=image["id"])
    annotation.write_text(json.dumps(document))
    root = tmp_path / "artifacts"
    environment = WorkerEnvironment(
        artifact_root=root,
        device="cpu",
        storage=Storage(artifact_root=root, s3=S3Store(endpoint_url=s3.endpoint)),
    )
    stored = s3.put(prefix + "models/base/checkpoint.pth", DATA)
    cases = {
        "checkpoint_corrupt": common_pb2.Artifact(uri=stored, sha256=digest(b"other bytes")),
        "checkpoint_unavailable": common_pb2.Artifact(
            uri=s3.uri(prefix + "models/gone/checkpoint.pth"), sha256=digest(DATA)
        ),
    }
    nc = await nats.connect(infrastructure.nats_url)
    subjects = Subjects(namespace=f"storage{uuid.uuid4().hex[:10]}")
    js = nc.jetstream()
    await ensure_streams(js, subjects)
    try:
        for reason, checkpoint in cases.items():
            run_id = uuid.uuid4().hex
            job = worker_pb2.TrainingJob(
                training_run=f"trainingRuns/{run_id}",
                attempt=1,
                spec=training_run_pb2.TrainingSpec(
                    dataset_uri=annotation.as_uri(),
                    architecture="retinanet_r18_fpn",
                    epochs=1,
                    seed=1,
                    device=training_run_pb2.TrainingSpec.CPU,
                ),
                base_model=worker_pb2.TrainingJob.BaseModel(
                    name="trainedModels/base",
                    architecture="retinanet_r18_fpn",
                    classes=["dump", "tire"],
                    checkpoint=checkpoint,
                ),
            )
            identity = JobIdentity(
                training_run=job.training_run, run_id=run_id, attempt=1, worker_id="test"
            )
            outcome = await execute_job(
                job,
                publisher=EventPublisher(js=js, subjects=subjects, job=identity),
                environment=environment,
                control=JobControl(),
            )
            assert outcome is JobOutcome.FAILED
            last = await js.get_last_msg(
                subjects.worker_events_stream, subjects.worker_event(run_id)
            )
            failed = worker_pb2.WorkerEvent.FromString(last.data).failed
            assert failed.reason == reason, failed.message
            assert "base model trainedModels/base" in failed.message
        kept = [p for p in root.rglob("*") if p.is_file() and "inputs" in p.parts]
        assert kept == [], "no unverified checkpoint is kept"
    finally:
        for stream in (subjects.jobs_stream, subjects.worker_events_stream, subjects.events_stream):
            await js.delete_stream(stream)
        await nc.close()
