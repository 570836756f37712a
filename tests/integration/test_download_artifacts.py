"""DownloadArtifact over real gRPC, Postgres and JetStream: any artifact of a model, a
training run or a model evaluation, by name or kind, verified before its first byte."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from shared.proto.raven.training.v1 import common_pb2, trained_model_pb2, trained_model_pb2_grpc
from shared.settings import Settings
from tests import pki as test_pki
from tests.evaluations import Fleet, artifact, images
from tests.support import violations

pb = trained_model_pb2
pytestmark = pytest.mark.timeout(120)
OWN_DOWNLOADER = test_pki.sa("own-downloader")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@pytest.fixture
async def fleet(
    runs, models, js, subjects, settings: Settings, dataset_uri
) -> AsyncIterator[Fleet]:
    engine = create_async_engine(settings.database_url)
    yield Fleet(runs, models, js, subjects, Path(settings.artifact_root), dataset_uri, engine)
    await engine.dispose()


async def download(
    models, parent: str, wanted: str
) -> tuple[common_pb2.Artifact | None, bytes, int]:
    """The header, the bytes and the number of chunks of a download."""
    header, data, chunks = None, bytearray(), 0
    async for part in models.DownloadArtifact(
        pb.DownloadArtifactRequest(parent=parent, artifact=wanted)
    ):
        if part.WhichOneof("part") == "artifact":
            assert header is None and not data, "the artifact comes first, once"
            header = part.artifact
        else:
            data += part.chunk
            chunks += 1
    return header, bytes(data), chunks


async def refused(models, parent: str, wanted: str) -> tuple[grpc.aio.AioRpcError, int]:
    """The error of a download and how many messages came before it."""
    received = 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in models.DownloadArtifact(
            pb.DownloadArtifactRequest(parent=parent, artifact=wanted)
        ):
            received += 1
    return caught.value, received


def path_of(found: common_pb2.Artifact) -> Path:
    return Path(found.uri.removeprefix("file://"))


async def evaluated(fleet: Fleet, model: pb.TrainedModel) -> tuple[str, list[common_pb2.Artifact]]:
    folder = f"evaluations/{uuid.uuid4()}"
    files = [
        artifact(
            fleet.root,
            f"{folder}/evaluation.json",
            b'{"ok": 1}',
            kind="evaluation",
            name="evaluation.json",
        ),
        artifact(
            fleet.root, f"{folder}/worst-1.png", PNG + b"w", kind="sample", name="worst-1.png"
        ),
        artifact(fleet.root, f"{folder}/best-1.png", PNG + b"b", kind="sample", name="best-1.png"),
        artifact(fleet.root, f"{folder}/pr.png", PNG + b"p", kind="plot", name="pr-curves.png"),
    ]
    name = await fleet.evaluation(model, images(), metrics={"coco/bbox_mAP": 0.3}, artifacts=files)
    return name, files


async def test_artifacts_of_a_model_a_run_and_an_evaluation_by_name_or_kind(models, fleet: Fleet):
    report = artifact(
        fleet.root,
        f"reports/{uuid.uuid4()}/report.html",
        b"<html></html>",
        kind="report",
        name="report.html",
    )
    model, run = await fleet.model(extra=[report])
    checkpoint = next(a for a in model.artifacts if a.kind == "checkpoint")
    expected = path_of(checkpoint).read_bytes()

    for wanted in ("checkpoint", "epoch_2.pth"):
        header, data, chunks = await download(models, model.name, wanted)
        assert header is not None and header.kind == "checkpoint"
        assert header.name == "epoch_2.pth"
        assert data == expected and header.size_bytes == len(expected)
        assert hashlib.sha256(data).hexdigest() == header.sha256
        assert chunks == -(-len(expected) // (1024 * 1024)) == 2

    header, data, _ = await download(models, run, "report")
    assert header is not None and header.name == "report.html" and data == b"<html></html>"
    header, data, _ = await download(models, model.name, "config.py")
    assert header is not None and header.kind == "config"

    evaluation, _ = await evaluated(fleet, model)
    header, data, _ = await download(models, evaluation, "worst-1.png")
    assert header is not None and header.kind == "sample" and data == PNG + b"w"
    header, data, _ = await download(models, evaluation, "plot")
    assert header is not None and header.name == "pr-curves.png" and data == PNG + b"p"
    header, data, _ = await download(models, evaluation, "evaluation")
    assert data == b'{"ok": 1}'
    # The evaluation's job is a run too.
    job = "trainingRuns/" + evaluation.rsplit("/", 1)[1]
    header, data, _ = await download(models, job, "best-1.png")
    assert data == PNG + b"b"


async def test_unknown_ambiguous_and_malformed_requests(models, fleet: Fleet):
    model, run = await fleet.model()
    evaluation, _ = await evaluated(fleet, model)

    error, _ = await refused(models, evaluation, "sample")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "best-1.png, worst-1.png" in violations(error)["artifact"]

    for parent, wanted in [
        (evaluation, "log"),
        (model.name, "worst-1.png"),
        (run, "no-such.png"),
    ]:
        error, _ = await refused(models, parent, wanted)
        assert error.code() == grpc.StatusCode.NOT_FOUND, (parent, wanted, error.details())
        assert repr(wanted) in (error.details() or "")

    other, _ = await fleet.model()
    for parent in [
        f"{other.name}/evaluations/{evaluation.rsplit('/', 1)[1]}",  # another model's
        f"trainingRuns/{uuid.uuid4()}",
        f"trainedModels/{uuid.uuid4()}",
        f"{model.name}/evaluations/{uuid.uuid4()}",
    ]:
        error, _ = await refused(models, parent, "evaluation")
        assert error.code() == grpc.StatusCode.NOT_FOUND, (parent, error.details())

    for parent, wanted, field in [
        ("", "checkpoint", "parent"),
        ("datasets/abc", "checkpoint", "parent"),
        (f"{model.name}/evaluations/x", "checkpoint", "parent"),
        (model.name, "", "artifact"),
        (model.name, "x" * 300, "artifact"),
    ]:
        error, _ = await refused(models, parent, wanted)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (parent, error.details())
        assert field in violations(error)


async def test_a_changed_or_missing_file_is_refused_before_its_first_byte(models, fleet: Fleet):
    model, _ = await fleet.model()
    evaluation, files = await evaluated(fleet, model)
    sample = path_of(files[1])
    original = sample.read_bytes()

    tampered = bytearray(original)
    tampered[-1] ^= 0xFF
    sample.write_bytes(bytes(tampered))
    error, received = await refused(models, evaluation, "worst-1.png")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert received == 0, "nothing is sent of a file that is not what was recorded"
    assert "recorded sha256" in (error.details() or "")
    assert str(fleet.root) not in (error.details() or ""), "no paths to callers"

    sample.write_bytes(original + b"more")
    error, received = await refused(models, evaluation, "worst-1.png")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and received == 0
    assert "recorded size" in (error.details() or "")

    sample.unlink()
    error, received = await refused(models, evaluation, "worst-1.png")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and received == 0
    assert "missing" in (error.details() or "")
    assert str(fleet.root) not in (error.details() or "")

    sample.write_bytes(original)
    _, data, _ = await download(models, evaluation, "worst-1.png")
    assert data == original


@pytest.fixture
async def own_downloader(pki: test_pki.Pki, trained_models) -> AsyncIterator[object]:
    """A caller that may download, but read only its own models and runs."""
    pki.write_policy(
        [
            *test_pki.BASE_GRANTS,
            (
                OWN_DOWNLOADER,
                ["trained_models.read.own", "training_runs.read.own", "trained_models.download"],
            ),
        ]
    )
    channel = pki.channel(trained_models.port, OWN_DOWNLOADER)
    try:
        yield trained_model_pb2_grpc.TrainedModelServiceStub(channel)
    finally:
        await channel.close()
        pki.write_policy(test_pki.BASE_GRANTS)


async def test_a_caller_limited_to_its_own_finds_anothers_artifacts_missing(
    models, fleet: Fleet, own_downloader
):
    model, run = await fleet.model()
    evaluation, _ = await evaluated(fleet, model)
    for parent, wanted in [(model.name, "checkpoint"), (run, "config"), (evaluation, "plot")]:
        error, received = await refused(own_downloader, parent, wanted)
        assert error.code() == grpc.StatusCode.NOT_FOUND, (parent, error.details())
        assert received == 0
    # The same calls by the model's creator succeed: the refusals were the ownership rule.
    header, _, _ = await download(models, evaluation, "plot")
    assert header is not None
