"""What a resumed attempt's work dir starts with: the verified checkpoints of the epoch it
resumes from and of the best epoch so far, where training chooses the model's checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.proto.raven.training.v1 import common_pb2
from shared.storage import sha256_file
from trainer_worker.inputs import place_earlier_checkpoints
from trainer_worker.job import ResumePoint, WorkerEnvironment

pytestmark = pytest.mark.timeout(30)


def stored(path: Path, content: bytes, *, sha256: str | None = None) -> common_pb2.Artifact:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return common_pb2.Artifact(
        kind="checkpoint", uri=path.as_uri(), sha256=sha256 or sha256_file(path)
    )


async def place(tmp_path: Path, best: common_pb2.Artifact) -> set[int]:
    resume_from = tmp_path / "attempt-1" / "work" / "epoch_3.pth"
    resume = ResumePoint(
        checkpoint=stored(resume_from, b"epoch 3"), epoch=3, best_checkpoint=best, best_epoch=1
    )
    return await place_earlier_checkpoints(
        resume,
        resume_from,
        tmp_path / "attempt-2" / "work",
        environment=WorkerEnvironment(artifact_root=tmp_path),
        inputs=tmp_path / "attempt-2" / "inputs",
    )


async def test_the_best_and_the_resumed_epochs_checkpoints_are_placed(tmp_path: Path) -> None:
    best = tmp_path / "attempt-1" / "work" / "epoch_1.pth"

    placed = await place(tmp_path, stored(best, b"epoch 1"))

    assert placed == {1, 3}
    work = tmp_path / "attempt-2" / "work"
    assert (work / "epoch_1.pth").read_bytes() == b"epoch 1"
    assert (work / "epoch_3.pth").read_bytes() == b"epoch 3"
    # Training prunes its work dir: the earlier attempt's files must outlive that.
    (work / "epoch_1.pth").unlink()
    assert best.read_bytes() == b"epoch 1"


@pytest.mark.parametrize("broken", ["corrupt", "missing"])
async def test_an_unverifiable_best_checkpoint_is_left_out(tmp_path: Path, broken: str) -> None:
    path = tmp_path / "attempt-1" / "work" / "epoch_1.pth"
    best = (
        stored(path, b"epoch 1", sha256="0" * 64)
        if broken == "corrupt"
        else common_pb2.Artifact(kind="checkpoint", uri=path.as_uri(), sha256="1" * 64)
    )

    placed = await place(tmp_path, best)

    assert placed == {3}
    assert sorted(p.name for p in (tmp_path / "attempt-2" / "work").iterdir()) == ["epoch_3.pth"]
