"""A worker whose artifact root is full or read-only: the run fails with a reason of its
own and a message saying what to do, and the same worker trains the next job once the
disk is fixed. The artifact root is a real tmpfs of its own, filled or remounted
read-only; the worker consumes real JetStream and trains with real mmdetection on CPU."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from shared.infra import Infrastructure
from shared.messaging import Subjects
from tests.support import eventually
from tests.worker_jobs import (
    events_until_terminal,
    job,
    kinds,
    queue_empty,
    running_consumer,
    submit,
)
from trainer_worker import storage_faults
from trainer_worker.job import WorkerEnvironment

pytest.importorskip("mmdet")
pytest.importorskip("PIL")
from trainer_worker.synthetic import make_dataset

pytestmark = pytest.mark.timeout(300)


class Disk:
    """A tmpfs mounted for one test: the worker's whole artifact root."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mount(self, size: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path))

    def remount(self, options: str) -> None:
        _mount("-o", f"remount,{options}", str(self.path))

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = Disk(tmp_path / "root")
    yield mounted
    mounted.unmount()


@pytest.fixture
def dataset_uri(tmp_path: Path) -> str:
    """Outside the artifact root: the dataset stays readable whatever happens to it."""
    make_dataset(tmp_path / "datasets" / "tiny", images=16, size=128)
    return (tmp_path / "datasets" / "tiny" / "annotations.json").as_uri()


@pytest.fixture
async def worker(
    infrastructure: Infrastructure, disk: Disk
) -> AsyncIterator[tuple[JetStreamContext, Subjects]]:
    async with running_consumer(
        infrastructure.nats_url,
        namespace="disk",
        worker_id="disk-worker",
        environment=WorkerEnvironment(artifact_root=disk.path, device="cpu"),
    ) as running:
        yield running


async def assert_trains_the_next_job(
    js: JetStreamContext, subjects: Subjects, dataset_uri: str
) -> None:
    good = await submit(js, subjects, job(uuid.uuid4().hex, dataset_uri))
    succeeded = await events_until_terminal(js, subjects, good)
    assert kinds(succeeded)[-1] == "succeeded", kinds(succeeded)
    await eventually(lambda: queue_empty(js, subjects))


def assert_actionable(message: str, disk: Disk) -> None:
    assert "RAVEN_ARTIFACT_ROOT" in message and "retry the run" in message, message
    assert str(disk.path) not in message and "Traceback" not in message, message
    assert "Error" not in message, "no library class names"


async def test_a_read_only_artifact_root_fails_the_run_and_the_worker_trains_the_next(
    worker: tuple[JetStreamContext, Subjects], disk: Disk, dataset_uri: str
) -> None:
    disk.mount("1g")
    disk.remount("ro")
    js, subjects = worker

    refused = await submit(js, subjects, job(uuid.uuid4().hex, dataset_uri))
    failed = await events_until_terminal(js, subjects, refused, timeout_s=60)
    assert kinds(failed) == ["preparing", "failed"]
    assert failed[-1].failed.reason == "artifact_store_unwritable"
    assert "read-only" in failed[-1].failed.message
    assert_actionable(failed[-1].failed.message, disk)

    disk.remount("rw")
    await assert_trains_the_next_job(js, subjects, dataset_uri)


async def test_a_disk_that_fills_during_training_fails_the_run_and_the_worker_trains_the_next(
    worker: tuple[JetStreamContext, Subjects], disk: Disk, dataset_uri: str
) -> None:
    # Room for the prepared dataset, the config and the log; not for a checkpoint.
    disk.mount("6m")
    js, subjects = worker

    full = await submit(js, subjects, job(uuid.uuid4().hex, dataset_uri))
    failed = await events_until_terminal(js, subjects, full)
    order = kinds(failed)
    assert "running" in order, f"training started before the disk filled: {order}"
    assert "checkpoint_saved" not in order
    assert failed[-1].failed.reason == "disk_full", failed[-1].failed
    assert "full" in failed[-1].failed.message
    assert_actionable(failed[-1].failed.message, disk)

    disk.remount("size=1g")
    await assert_trains_the_next_job(js, subjects, dataset_uri)


def test_the_probe_tells_a_full_disk_from_a_read_only_one(disk: Disk) -> None:
    disk.mount("2m")
    assert storage_faults.probe(disk.path / "runs" / "x" / "work") is None
    filler = disk.path / "filler"
    with filler.open("wb", buffering=0) as file, pytest.raises(OSError):
        while True:
            file.write(b"\0" * 65536)
    assert storage_faults.probe(disk.path) == (storage_faults.DISK_FULL, "no space left")
    filler.unlink()
    disk.remount("ro")
    assert storage_faults.probe(disk.path) == (storage_faults.UNWRITABLE, "it is read-only")
