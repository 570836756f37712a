"""The worker against real JetStream: jobs in, WorkerEvents out, acks only at the end."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest
from nats.js import JetStreamContext

from shared.infra import Infrastructure
from shared.messaging import Subjects
from shared.proto.raven.training.v1 import training_run_pb2, worker_pb2
from tests.images import write_image
from tests.support import eventually
from tests.worker_jobs import (
    events_until_terminal,
    job,
    kinds,
    queue_empty,
    request_cancel,
    running_consumer,
    submit,
)
from trainer_worker.devices import GpuPool
from trainer_worker.job import WorkerEnvironment

pytest.importorskip("mmdet")
pytest.importorskip("PIL")
from trainer_worker.synthetic import make_dataset

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def claims() -> dict[str, worker_pb2.ClaimJobResponse] | None:
    """Answers of a stand-in TrainingRunService by run id; None: the worker claims nothing."""
    return None


@pytest.fixture
def gpus() -> tuple[str, ...]:
    """The GPUs the worker hands out; none: it trains on CPU."""
    return ()


@pytest.fixture
async def worker(
    infrastructure: Infrastructure,
    tmp_path: Path,
    claims: dict[str, worker_pb2.ClaimJobResponse] | None,
    gpus: tuple[str, ...],
) -> AsyncIterator[tuple[JetStreamContext, Subjects]]:
    environment = WorkerEnvironment(
        artifact_root=tmp_path, device="auto" if gpus else "cpu", gpus=GpuPool(gpus)
    )
    async with running_consumer(
        infrastructure.nats_url,
        namespace="worker",
        worker_id="test-worker",
        environment=environment,
        claims=claims,
    ) as running:
        yield running


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_bad_dataset_fails_and_the_worker_trains_the_next_job(
    worker: tuple[JetStreamContext, Subjects], tmp_path: Path
) -> None:
    js, subjects = worker
    bad = await submit(js, subjects, job(uuid.uuid4().hex, "file:///nowhere/annotations.json"))
    make_dataset(tmp_path / "datasets" / "tiny", images=16, size=128)
    # Relative to the artifact root.
    good = await submit(js, subjects, job(uuid.uuid4().hex, "datasets/tiny/annotations.json"))

    failed = await events_until_terminal(js, subjects, bad)
    assert kinds(failed) == ["preparing", "failed"]
    assert failed[-1].failed.reason == "dataset_unreadable"
    assert "/nowhere/annotations.json" in failed[-1].failed.message
    assert {(e.training_run, e.attempt, e.worker_id) for e in failed} == {
        (f"trainingRuns/{bad}", 1, "test-worker")
    }
    assert len({e.event_id for e in failed}) == len(failed)

    succeeded = await events_until_terminal(js, subjects, good)
    # Heartbeats come every ack_wait / 4, wherever the job is.
    succeeded = [e for e in succeeded if e.WhichOneof("payload") != "heartbeat"]
    order = kinds(succeeded)
    assert order[:3] == ["preparing", "dataset_prepared", "running"]
    assert order[-1] == "succeeded"
    assert {"progress", "evaluation", "checkpoint_saved"} <= set(order)
    saved = next(
        e.checkpoint_saved for e in succeeded if e.WhichOneof("payload") == "checkpoint_saved"
    )
    assert saved.epoch == 1 and saved.checkpoint.uri.startswith("file://")
    summary = succeeded[1].dataset_prepared
    assert (summary.image_count, list(summary.classes), summary.split_seed) == (
        16,
        ["dump", "tire"],
        3,
    )
    assert summary.train_image_count + summary.val_image_count == 16
    assert succeeded[2].running.device == "cpu"
    result = succeeded[-1].succeeded
    assert result.facts.epochs_trained == 1 and result.facts.best_epoch == 1
    assert result.facts.parameter_count > 0
    assert [e.epoch for e in result.epochs] == [1]
    for artifact in result.artifacts:
        path = Path(urlparse(artifact.uri).path)
        assert path.parent == tmp_path / "models" / good
        assert sha256_of(path) == artifact.sha256

    # Both jobs were acked (right after their terminal event): the work queue empties.
    await eventually(lambda: queue_empty(js, subjects))


def broken_copies(source: Path, outside: Path) -> dict[str, tuple[str, str]]:
    """Copies of the dataset in `source`, each broken one way: its annotation file, and what
    the refusal must name."""
    document = json.loads((source / "annotations.json").read_text())
    first = document["images"][0]
    write_image(outside / "secret.png", first["width"], first["height"])
    cases: dict[str, tuple[str, str]] = {}

    def copy(case: str, change: Callable[[Path, dict], str]) -> None:
        folder = source.parent / case
        shutil.copytree(source, folder, symlinks=True)
        changed = json.loads(json.dumps(document))
        needle = change(folder, changed)
        (folder / "annotations.json").write_text(json.dumps(changed))
        cases[case] = (str(folder / "annotations.json"), needle)

    def rename(name: str) -> Callable[[Path, dict], str]:
        def change(folder: Path, changed: dict) -> str:
            changed["images"][0]["file_name"] = name
            return name

        return change

    def linked(folder: Path, changed: dict) -> str:
        (folder / "images" / "link.png").symlink_to(outside / "secret.png")
        changed["images"][0]["file_name"] = "images/link.png"
        return "images/link.png"

    def cut(folder: Path, changed: dict) -> str:
        path = folder / first["file_name"]
        path.write_bytes(path.read_bytes()[:200])
        return first["file_name"]

    def emptied(folder: Path, changed: dict) -> str:
        (folder / first["file_name"]).write_bytes(b"")
        return first["file_name"]

    def resized(folder: Path, changed: dict) -> str:
        changed["images"][0]["width"] = first["width"] * 2
        return f"declared {first['width'] * 2}x{first['height']}"

    copy("traversal", rename(f"../../{outside.name}/secret.png"))
    copy("etc_passwd", rename("/etc/passwd"))
    copy("symlink_out", linked)
    copy("truncated", cut)
    copy("zero_bytes", emptied)
    copy("wrong_size", resized)
    return cases


async def test_refused_datasets_fail_before_training_and_the_worker_serves_the_next_job(
    worker: tuple[JetStreamContext, Subjects], tmp_path: Path
) -> None:
    js, subjects = worker
    make_dataset(tmp_path / "sets" / "good", images=16, size=128)
    cases = broken_copies(tmp_path / "sets" / "good", tmp_path / "elsewhere")
    runs = {
        case: await submit(js, subjects, job(uuid.uuid4().hex, path))
        for case, (path, _) in cases.items()
    }
    good = await submit(
        js, subjects, job(uuid.uuid4().hex, str(tmp_path / "sets" / "good" / "annotations.json"))
    )
    for case, run_id in runs.items():
        seen = [e for e in await events_until_terminal(js, subjects, run_id)]
        seen = [e for e in seen if e.WhichOneof("payload") != "heartbeat"]
        assert kinds(seen) == ["preparing", "failed"], case
        failure = seen[-1].failed
        assert failure.reason == "dataset_invalid", (case, failure.message)
        assert cases[case][1] in failure.message, (case, failure.message)
        assert not (tmp_path / "models" / run_id).exists()

    first = await events_until_terminal(js, subjects, good, stop_at="running")
    assert kinds([e for e in first if e.WhichOneof("payload") != "heartbeat"]) == [
        "preparing",
        "dataset_prepared",
        "running",
    ]
    await request_cancel(js, subjects, good)
    rest = await events_until_terminal(js, subjects, good, timeout_s=90)
    assert kinds(rest)[-1] == "cancelled"
    await eventually(lambda: queue_empty(js, subjects))


async def test_a_cancel_request_stops_the_running_job(
    worker: tuple[JetStreamContext, Subjects], tmp_path: Path
) -> None:
    js, subjects = worker
    make_dataset(tmp_path / "tiny", images=16, size=128)
    run_id = await submit(
        js, subjects, job(uuid.uuid4().hex, str(tmp_path / "tiny" / "annotations.json"), epochs=50)
    )
    first = await events_until_terminal(js, subjects, run_id, stop_at="progress")
    assert kinds(first)[-1] == "progress"

    await request_cancel(js, subjects, run_id)

    rest = await events_until_terminal(js, subjects, run_id, timeout_s=60)
    assert kinds(rest)[-1] == "cancelled"
    assert not (tmp_path / "models" / run_id).exists()


async def test_a_cancel_recorded_before_the_job_began_stops_it(
    worker: tuple[JetStreamContext, Subjects], tmp_path: Path
) -> None:
    js, subjects = worker
    make_dataset(tmp_path / "tiny", images=16, size=128)
    run_id = uuid.uuid4().hex
    # The run's state subject ends with CANCELLING; a later state change of another run
    # does not hide it.
    for run, to_state in (
        (run_id, training_run_pb2.TrainingRun.State.PREPARING),
        (run_id, training_run_pb2.TrainingRun.State.CANCELLING),
        (uuid.uuid4().hex, training_run_pb2.TrainingRun.State.RUNNING),
    ):
        changed = training_run_pb2.TrainingRunEvent(
            training_run=f"trainingRuns/{run}",
            state_changed=training_run_pb2.TrainingRunEvent.StateChanged(to_state=to_state),
        )
        await js.publish(subjects.run_state(run), changed.SerializeToString())
    await submit(js, subjects, job(run_id, str(tmp_path / "tiny" / "annotations.json"), epochs=50))

    # Fifty epochs would outlast the wait: the job stops on the recorded cancel.
    events = await events_until_terminal(js, subjects, run_id, timeout_s=60)
    assert kinds(events)[-1] == "cancelled"


# Names CUDA knows nothing of: the ranks find no GPU and train on CPU over gloo, and what
# is tested is the worker's part, which is the same with real GPUs.
@pytest.mark.parametrize("gpus", [("GPU-stand-in-0", "GPU-stand-in-1")])
async def test_a_run_asking_for_two_gpus_leases_both_and_trains_under_the_launcher(
    worker: tuple[JetStreamContext, Subjects], tmp_path: Path
) -> None:
    js, subjects = worker
    make_dataset(tmp_path / "tiny", images=16, size=128)
    two_gpus = job(uuid.uuid4().hex, str(tmp_path / "tiny" / "annotations.json"))
    two_gpus.spec.device = training_run_pb2.TrainingSpec.Device.GPU
    two_gpus.spec.gpu_count = 2
    two_gpus.spec.batch_size = 5
    run_id = await submit(js, subjects, two_gpus)

    events = await events_until_terminal(js, subjects, run_id)
    assert kinds(events)[-1] == "succeeded", events[-1]
    notices = {
        e.notice.code: e.notice.message for e in events if e.WhichOneof("payload") == "notice"
    }
    assert notices["batch_size"] == "batch size 5 over 2 GPUs: 2 per GPU, 4 per iteration"
    assert "device" not in notices
    artifacts = {a.kind: Path(urlparse(a.uri).path) for a in events[-1].succeeded.artifacts}
    assert "launcher = 'pytorch'" in artifacts["config"].read_text()
    assert "GPU number: 2" in artifacts["log"].read_text()


GRANTED_AS_ATTEMPT_2 = "0" * 32
REFUSED = "1" * 32


@pytest.mark.parametrize(
    "claims",
    [
        {
            GRANTED_AS_ATTEMPT_2: worker_pb2.ClaimJobResponse(granted=True, attempt=2),
            REFUSED: worker_pb2.ClaimJobResponse(granted=False, attempt=1, refusal="cancelled"),
        }
    ],
)
async def test_claims_fence_the_attempt_and_drop_refused_jobs(
    worker: tuple[JetStreamContext, Subjects],
) -> None:
    js, subjects = worker
    await submit(js, subjects, job(REFUSED, "file:///nowhere/refused.json"))
    await submit(js, subjects, job(GRANTED_AS_ATTEMPT_2, "file:///nowhere/granted.json"))

    events = await events_until_terminal(js, subjects, GRANTED_AS_ATTEMPT_2, timeout_s=30)
    # The granted claim moved the run to PREPARING: a `preparing` report would be refused.
    assert kinds(events) == ["failed"]
    # Redelivered as attempt 1, granted as attempt 2: every report says 2.
    assert {e.attempt for e in events} == {2}
    # The refused job was acked without a single event.
    await eventually(lambda: queue_empty(js, subjects))
    events_info = await js.stream_info(subjects.worker_events_stream)
    assert events_info.state.messages == 0
