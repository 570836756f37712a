"""Publication against the channel's model (its incumbent), over real gRPC, Postgres and
JetStream: what is missing, how far short a candidate falls, the server's policy, and
the comparison recorded on the publication event."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from services.trained_models.main import TrainedModelsApp
from shared.proto.raven.training.v1 import trained_model_pb2, trained_model_pb2_grpc
from shared.settings import Settings
from tests import pki as test_pki
from tests.evaluations import Fleet, Images, artifact, images
from tests.support import eventually, violations

pb = trained_model_pb2
pytestmark = pytest.mark.timeout(120)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


@pytest.fixture
async def fleet(
    runs, models, js, subjects, settings: Settings, dataset_uri
) -> AsyncIterator[Fleet]:
    engine = create_async_engine(settings.database_url)
    yield Fleet(runs, models, js, subjects, Path(settings.artifact_root), dataset_uri, engine)
    await engine.dispose()


def channel() -> str:
    return f"gate-{uuid.uuid4().hex[:8]}"


async def refused(call, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


async def published_events(models, model: pb.TrainedModel) -> list[pb.PublicationEvent]:
    found = await models.ListPublicationEvents(
        pb.ListPublicationEventsRequest(trained_model=model.name)
    )
    return [e for e in found.events if e.action == "published"]


async def test_a_candidate_replaces_the_incumbent_only_when_not_worse_on_its_images(
    models, fleet: Fleet
):
    where = channel()
    incumbent, _ = await fleet.model(display_name="incumbent")
    candidate, _ = await fleet.model(display_name="candidate")
    first = await models.PublishTrainedModel(
        pb.PublishTrainedModelRequest(
            name=incumbent.name, channel=where, reason="first", beat_incumbent=True
        )
    )
    assert first.publication.channel == where, "an empty channel publishes without comparison"
    (event,) = await published_events(models, incumbent)
    assert not event.HasField("incumbent_comparison")

    publish = pb.PublishTrainedModelRequest(
        name=candidate.name,
        channel=where,
        reason="better",
        beat_incumbent=True,
        incumbent_tolerance=0.02,
    )
    details = await refused(models.PublishTrainedModel(publish))
    assert f"channel's model {incumbent.name} has no succeeded evaluation" in details

    val = images("val")
    benchmark = await fleet.evaluation(
        incumbent, val, metrics={"coco/bbox_mAP": 0.40}, per_class_ap={"tire": 0.5}
    )
    details = await refused(models.PublishTrainedModel(publish))
    assert f"{candidate.name} has no succeeded evaluation on the images" in details
    assert benchmark in details and val.dataset_fingerprint in details

    # The same dataset and split, other images; a better result of a job that failed.
    other = images("val")
    await fleet.evaluation(
        candidate,
        Images(val.dataset_fingerprint, "val", other.images_fingerprint),
        metrics={"coco/bbox_mAP": 0.9},
    )
    await fleet.evaluation(candidate, val, metrics={"coco/bbox_mAP": 0.9}, state="FAILED")
    details = await refused(models.PublishTrainedModel(publish))
    assert "no succeeded evaluation on the images" in details

    short = await fleet.evaluation(candidate, val, metrics={"coco/bbox_mAP": 0.35})
    details = await refused(models.PublishTrainedModel(publish))
    assert "0.3500" in details and "0.4000" in details and short in details
    assert "0.0500 below" in details and "falls 0.0300 short" in details
    assert str(fleet.root) not in details and "file:" not in details
    still = await models.GetTrainedModel(pb.GetTrainedModelRequest(name=incumbent.name))
    assert still.publication.published and still.publication.channel == where

    # Another metric: the class AP the candidate never measured.
    publish.incumbent_metric = "AP/tire"
    details = await refused(models.PublishTrainedModel(publish))
    assert "AP/tire is not measured by" in details and short in details

    publish.incumbent_metric = ""
    enough = await fleet.evaluation(candidate, val, metrics={"coco/bbox_mAP": 0.385})
    published = await models.PublishTrainedModel(publish)
    assert published.publication.published and published.publication.channel == where
    replaced = await models.GetTrainedModel(pb.GetTrainedModelRequest(name=incumbent.name))
    assert not replaced.publication.published

    (event,) = await published_events(models, candidate)
    assert event.replaced_model == incumbent.name
    comparison = event.incumbent_comparison
    assert comparison.candidate_evaluation == enough
    assert comparison.incumbent_evaluation == benchmark
    assert comparison.metric == "coco/bbox_mAP"
    assert comparison.candidate_value == pytest.approx(0.385)
    assert comparison.incumbent_value == pytest.approx(0.40)
    assert comparison.tolerance == pytest.approx(0.02)


async def test_without_beat_incumbent_the_default_policy_does_not_compare(models, fleet: Fleet):
    where = channel()
    incumbent, _ = await fleet.model()
    candidate, _ = await fleet.model()
    await models.PublishTrainedModel(
        pb.PublishTrainedModelRequest(name=incumbent.name, channel=where)
    )
    await fleet.evaluation(incumbent, images(), metrics={"coco/bbox_mAP": 0.9})
    published = await models.PublishTrainedModel(
        pb.PublishTrainedModelRequest(name=candidate.name, channel=where)
    )
    assert published.publication.channel == where
    (event,) = await published_events(models, candidate)
    assert not event.HasField("incumbent_comparison")


async def test_a_bad_metric_or_tolerance_is_an_invalid_argument_naming_the_field(
    models, fleet: Fleet
):
    model, _ = await fleet.model()
    for request, field in [
        (
            pb.PublishTrainedModelRequest(name=model.name, incumbent_metric="mAP"),
            "incumbent_metric",
        ),
        (
            pb.PublishTrainedModelRequest(name=model.name, incumbent_tolerance=1.5),
            "incumbent_tolerance",
        ),
        (
            pb.PublishTrainedModelRequest(name=model.name, incumbent_tolerance=-0.1),
            "incumbent_tolerance",
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await models.PublishTrainedModel(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in violations(caught.value)


@pytest.fixture
async def strict_models(
    settings: Settings, pki: test_pki.Pki, trained_models
) -> AsyncIterator[trained_model_pb2_grpc.TrainedModelServiceStub]:
    """A second TrainedModelService on the same stack whose policy requires the
    comparison, with a tolerance of 0.01."""
    app = TrainedModelsApp(
        settings.model_copy(
            update={
                "publish_require_incumbent": True,
                "publish_incumbent_tolerance": 0.01,
                "trained_models_addr": "127.0.0.1:0",
            }
        )
    )
    await app.start()
    channel_ = pki.channel(app.port, test_pki.ADMIN)
    try:
        yield trained_model_pb2_grpc.TrainedModelServiceStub(channel_)
    finally:
        await channel_.close()
        await app.stop(grace_s=1)


async def test_the_server_policy_requires_the_comparison_and_caps_the_tolerance(
    strict_models, fleet: Fleet
):
    where = channel()
    incumbent, _ = await fleet.model()
    candidate, _ = await fleet.model()
    await strict_models.PublishTrainedModel(
        pb.PublishTrainedModelRequest(name=incumbent.name, channel=where)
    )
    val = images()
    await fleet.evaluation(incumbent, val, metrics={"coco/bbox_mAP": 0.50})
    await fleet.evaluation(candidate, val, metrics={"coco/bbox_mAP": 0.48})

    # Refused before its files are read: a missing checkpoint is not what it is told.
    checkpoint = Path(next(a for a in candidate.artifacts if a.kind == "checkpoint").uri[7:])
    moved = await asyncio.to_thread(checkpoint.rename, checkpoint.with_suffix(".away"))
    for request in [
        pb.PublishTrainedModelRequest(name=candidate.name, channel=where),
        # Neither waived nor loosened by the request.
        pb.PublishTrainedModelRequest(name=candidate.name, channel=where, beat_incumbent=False),
        pb.PublishTrainedModelRequest(
            name=candidate.name, channel=where, beat_incumbent=True, incumbent_tolerance=0.05
        ),
    ]:
        details = await refused(strict_models.PublishTrainedModel(request))
        assert "the tolerance is 0.01" in details and "falls 0.0100 short" in details
    await asyncio.to_thread(moved.rename, checkpoint)

    better = await fleet.evaluation(candidate, val, metrics={"coco/bbox_mAP": 0.495})
    published = await strict_models.PublishTrainedModel(
        pb.PublishTrainedModelRequest(name=candidate.name, channel=where)
    )
    assert published.publication.channel == where
    (event,) = await published_events(strict_models, candidate)
    assert event.incumbent_comparison.candidate_evaluation == better
    assert event.incumbent_comparison.tolerance == pytest.approx(0.01)


async def test_evaluations_made_through_the_api_compare_gate_and_download(models, fleet: Fleet):
    """The whole flow on the public API: EvaluateTrainedModel, the jobs driven by a
    worker's events, then CompareTrainedModels, the gate and DownloadArtifact."""
    where = channel()
    incumbent, _ = await fleet.model(display_name="incumbent")
    candidate, _ = await fleet.model(display_name="candidate")
    await models.PublishTrainedModel(
        pb.PublishTrainedModelRequest(name=incumbent.name, channel=where)
    )
    on = images("all")
    sample = artifact(
        fleet.root,
        f"evaluations/{uuid.uuid4()}/worst-1.png",
        PNG,
        kind="sample",
        name="worst-1.png",
    )
    benchmark = await fleet.evaluated(incumbent, on, metrics={"coco/bbox_mAP": 0.40})
    weak = await fleet.evaluated(candidate, on, metrics={"coco/bbox_mAP": 0.30}, artifacts=[sample])
    assert weak.dataset_fingerprint == on.dataset_fingerprint
    assert weak.review.images_fingerprint == on.images_fingerprint

    compared = await models.CompareTrainedModels(
        pb.CompareTrainedModelsRequest(trained_models=[candidate.name, incumbent.name])
    )
    assert [(r.evaluation, r.values["coco/bbox_mAP"]) for r in compared.rows] == [
        (weak.name, pytest.approx(0.30)),
        (benchmark.name, pytest.approx(0.40)),
    ]
    assert (compared.split, compared.images_fingerprint) == ("all", on.images_fingerprint)

    publish = pb.PublishTrainedModelRequest(name=candidate.name, channel=where, beat_incumbent=True)
    details = await refused(models.PublishTrainedModel(publish))
    assert weak.name in details and benchmark.name in details and "falls 0.1000 short" in details

    header = None
    data = b""
    async for part in models.DownloadArtifact(
        pb.DownloadArtifactRequest(parent=weak.name, artifact="worst-1.png")
    ):
        if part.WhichOneof("part") == "artifact":
            header = part.artifact
        else:
            data += part.chunk
    assert header is not None and header.sha256 == sample.sha256 and data == PNG

    strong = await fleet.evaluated(candidate, on, metrics={"coco/bbox_mAP": 0.41})
    await models.PublishTrainedModel(publish)
    (event,) = await published_events(models, candidate)
    assert event.incumbent_comparison.candidate_evaluation == strong.name
    assert event.incumbent_comparison.incumbent_evaluation == benchmark.name


async def test_a_candidate_waiting_for_the_channel_is_compared_with_the_model_it_replaces(
    models, fleet: Fleet
):
    """x and y both beat the incumbent when they ask; x takes the channel first, so y,
    waiting on the channel's lock meanwhile, is compared with x (and falls short), not
    with the incumbent it was checked against a moment before."""
    where = channel()
    incumbent, _ = await fleet.model()
    x, _ = await fleet.model()
    y, _ = await fleet.model()
    on = images()
    benchmark = await fleet.evaluation(incumbent, on, metrics={"coco/bbox_mAP": 0.30})
    x_eval = await fleet.evaluation(x, on, metrics={"coco/bbox_mAP": 0.50})
    await fleet.evaluation(y, on, metrics={"coco/bbox_mAP": 0.40})
    await models.PublishTrainedModel(
        pb.PublishTrainedModelRequest(name=incumbent.name, channel=where)
    )

    def publish(model: pb.TrainedModel) -> asyncio.Task[pb.TrainedModel]:
        request = pb.PublishTrainedModelRequest(name=model.name, channel=where, beat_incumbent=True)
        return asyncio.ensure_future(models.PublishTrainedModel(request))

    async def waiting() -> int:
        async with fleet.engine.connect() as connection:
            found = await connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database() "
                    "AND query LIKE '%pg_advisory_xact_lock%'"
                )
            )
            return int(found.scalar_one())

    async with fleet.engine.begin() as holder:
        # Holds the channel as a publication does (services/trained_models/repository.py).
        await holder.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
            {"key": "channel:" + where},
        )
        first = publish(x)
        await eventually(lambda: _at_least(waiting, 1))
        second = publish(y)
        await eventually(lambda: _at_least(waiting, 2))
    assert (await first).publication.channel == where
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await second
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert x_eval in (caught.value.details() or "") and benchmark not in (
        caught.value.details() or ""
    )
    (event,) = await published_events(models, x)
    assert event.incumbent_comparison.incumbent_evaluation == benchmark
    assert event.replaced_model == incumbent.name


async def _at_least(probe, count: int) -> bool:
    return await probe() >= count
