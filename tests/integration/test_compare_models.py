"""CompareTrainedModels over real gRPC and Postgres: models side by side from their
evaluations on one set of images, and every way a request can be wrong."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from shared.proto.raven.training.v1 import trained_model_pb2, trained_model_pb2_grpc
from shared.settings import Settings
from tests import pki as test_pki
from tests.cli import raven
from tests.evaluations import Fleet, Images, artifact, images
from tests.support import violations

pb = trained_model_pb2
pytestmark = pytest.mark.timeout(120)
OWN_READER = test_pki.sa("own-model-reader")


@pytest.fixture
async def fleet(
    runs, models, js, subjects, settings: Settings, dataset_uri
) -> AsyncIterator[Fleet]:
    engine = create_async_engine(settings.database_url)
    yield Fleet(runs, models, js, subjects, Path(settings.artifact_root), dataset_uri, engine)
    await engine.dispose()


def compare(*names: str, **fields: str) -> pb.CompareTrainedModelsRequest:
    return pb.CompareTrainedModelsRequest(trained_models=list(names), **fields)


async def failure(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_models_side_by_side_from_their_newest_evaluations_on_common_images(
    models, fleet: Fleet
):
    a, _ = await fleet.model(display_name="model a")
    b, _ = await fleet.model(display_name="model b")
    c, _ = await fleet.model(display_name="model c")
    val, test = images("val"), images("test")
    await fleet.evaluation(a, val, metrics={"coco/bbox_mAP": 0.1})
    a_val = await fleet.evaluation(
        a,
        val,
        metrics={"coco/bbox_mAP": 0.3, "coco/bbox_mAP_50": 0.6, "coco/bbox_mAP_s": -1.0},
        per_class_ap={"tire": 0.4, "dump": -1.0},
    )
    b_val = await fleet.evaluation(
        b, val, metrics={"coco/bbox_mAP": 0.2, "coco/AR@100": 0.5}, per_class_ap={"dump": 0.1}
    )
    c_val = await fleet.evaluation(c, val, metrics={"coco/bbox_mAP": 0.25})
    # Newer, but not common to all three: b has no test evaluation.
    await fleet.evaluation(a, test, metrics={"coco/bbox_mAP": 0.9})
    await fleet.evaluation(c, test, metrics={"coco/bbox_mAP": 0.8})
    # A job that did not succeed is no evaluation.
    await fleet.evaluation(b, val, metrics={"coco/bbox_mAP": 0.99}, state="CANCELLED")

    found = await models.CompareTrainedModels(compare(c.name, a.name, b.name))
    assert (found.dataset_fingerprint, found.split, found.images_fingerprint) == (
        val.dataset_fingerprint,
        "val",
        val.images_fingerprint,
    )
    assert found.image_count == 6
    # COCO's order, then the classes as the rows first name them; -1 (nothing to
    # measure) is absent.
    assert list(found.metrics) == [
        "coco/bbox_mAP",
        "coco/bbox_mAP_50",
        "coco/AR@100",
        "AP/tire",
        "AP/dump",
    ]
    assert [(r.trained_model, r.display_name, r.evaluation) for r in found.rows] == [
        (c.name, "model c", c_val),
        (a.name, "model a", a_val),
        (b.name, "model b", b_val),
    ]
    assert dict(found.rows[1].values) == pytest.approx(
        {"coco/bbox_mAP": 0.3, "coco/bbox_mAP_50": 0.6, "AP/tire": 0.4}
    )
    assert dict(found.rows[2].values) == pytest.approx(
        {"coco/bbox_mAP": 0.2, "coco/AR@100": 0.5, "AP/dump": 0.1}
    )

    # Two models share the newer test images: those are chosen, unless asked otherwise.
    newest = await models.CompareTrainedModels(compare(a.name, c.name))
    assert (newest.split, newest.images_fingerprint) == ("test", test.images_fingerprint)
    asked = await models.CompareTrainedModels(compare(a.name, c.name, split="val"))
    assert asked.images_fingerprint == val.images_fingerprint
    by_dataset = await models.CompareTrainedModels(
        compare(a.name, c.name, dataset_fingerprint=val.dataset_fingerprint)
    )
    assert by_dataset.images_fingerprint == val.images_fingerprint


async def test_models_without_evaluations_on_common_images_are_named(models, fleet: Fleet):
    a, _ = await fleet.model()
    b, _ = await fleet.model()
    val = images("val")
    await fleet.evaluation(a, val, metrics={"coco/bbox_mAP": 0.3})
    error = await failure(models.CompareTrainedModels(compare(a.name, b.name)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert b.name in (error.details() or "") and a.name not in (error.details() or "")

    # Same dataset and split, other images (another seed's split).
    await fleet.evaluation(
        b, Images(val.dataset_fingerprint, "val", "img-other"), metrics={"coco/bbox_mAP": 0.3}
    )
    error = await failure(models.CompareTrainedModels(compare(a.name, b.name)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no one set of images" in (error.details() or "")

    error = await failure(models.CompareTrainedModels(compare(a.name, b.name, split="test")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "split 'test'" in (error.details() or "")


async def test_bad_requests_name_their_field_and_unknown_models_are_not_found(models, fleet: Fleet):
    a, _ = await fleet.model()
    b, _ = await fleet.model()
    cases = [
        (compare(a.name), "trained_models"),
        (compare(*[f"trainedModels/{uuid.uuid4()}" for _ in range(21)]), "trained_models"),
        (compare(a.name, a.name), "trained_models"),
        (compare(a.name, "models/x"), "trained_models[1]"),
        (compare(a.name, b.name, split="holdout"), "split"),
        (compare(a.name, b.name, dataset_fingerprint="f" * 300), "dataset_fingerprint"),
    ]
    for request, field in cases:
        error = await failure(models.CompareTrainedModels(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.details())
        assert field in violations(error), (field, violations(error))

    unknown = f"trainedModels/{uuid.uuid4()}"
    error = await failure(models.CompareTrainedModels(compare(a.name, unknown)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert unknown.split("/")[1] in (error.details() or "")


@pytest.fixture
async def own_reader(pki: test_pki.Pki, trained_models) -> AsyncIterator[object]:
    """A caller that may read (and compare) only the models it created."""
    pki.write_policy([*test_pki.BASE_GRANTS, (OWN_READER, ["trained_models.read.own"])])
    channel = pki.channel(trained_models.port, OWN_READER)
    try:
        yield trained_model_pb2_grpc.TrainedModelServiceStub(channel)
    finally:
        await channel.close()
        pki.write_policy(test_pki.BASE_GRANTS)


async def test_a_caller_limited_to_its_own_models_finds_anothers_missing(fleet: Fleet, own_reader):
    a, _ = await fleet.model()
    b, _ = await fleet.model()
    val = images()
    await fleet.evaluation(a, val, metrics={"coco/bbox_mAP": 0.3})
    await fleet.evaluation(b, val, metrics={"coco/bbox_mAP": 0.3})
    error = await failure(own_reader.CompareTrainedModels(compare(a.name, b.name)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "does not exist" in (error.details() or "")


async def test_the_cli_compares_and_downloads_what_the_api_serves(
    pki, training_runs, trained_models, fleet: Fleet, tmp_path
):
    """`raven models compare` and `raven models download` against these servers."""
    a, _ = await fleet.model(display_name="cli a")
    b, _ = await fleet.model(display_name="cli b")
    test = images("test")
    sample = artifact(
        fleet.root,
        f"evaluations/{uuid.uuid4()}/worst-1.png",
        b"\x89PNG" * 300,
        kind="sample",
        name="worst-1.png",
    )
    evaluation = await fleet.evaluation(
        a, test, metrics={"coco/bbox_mAP": 0.3125}, artifacts=[sample]
    )
    await fleet.evaluation(b, test, metrics={"coco/bbox_mAP": 0.1875})

    compared = await raven(
        pki,
        training_runs,
        trained_models,
        "models",
        "compare",
        a.name,
        b.name,
        "--dataset",
        test.dataset_fingerprint,
        "--split",
        "test",
    )
    assert compared.exit_code == 0, compared.output
    assert "0.312" in compared.output and "0.188" in compared.output
    assert "cli a" in compared.output and "6 images" in compared.output

    fetched = await raven(
        pki,
        training_runs,
        trained_models,
        "models",
        "download",
        evaluation,
        "worst-1.png",
        "--out",
        str(tmp_path),
    )
    assert fetched.exit_code == 0, fetched.output
    assert (tmp_path / "worst-1.png").read_bytes() == b"\x89PNG" * 300

    missing = await raven(
        pki,
        training_runs,
        trained_models,
        "models",
        "download",
        evaluation,
        "plot",
        "--out",
        str(tmp_path),
    )
    assert missing.exit_code != 0 and "plot" in missing.output
