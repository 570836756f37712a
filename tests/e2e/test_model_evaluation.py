"""Evaluation jobs through a real worker over real JetStream: a model the worker trained is
evaluated on images of another shape than the training data's (other sizes, ids, category
ids in another order, nested file names, the dataset's own splits), and what it reports is
what pycocotools' COCOeval finds on the detections it stored."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
from nats.js import JetStreamContext

from shared.infra import Infrastructure
from shared.messaging import Subjects
from shared.proto.raven.training.v1 import common_pb2, training_run_pb2, worker_pb2
from shared.storage import Storage
from tests.s3 import S3Server
from tests.worker_jobs import (
    events_until_terminal,
    kinds,
    request_cancel,
    running_consumer,
    submit,
)
from trainer_worker.job import WorkerEnvironment

pytest.importorskip("mmdet")
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer_worker.review.coco_eval import STAT_NAMES
from trainer_worker.review.render import TRUE_COLOUR
from trainer_worker.synthetic import make_dataset

pytestmark = pytest.mark.timeout(900)

Spec = training_run_pb2.TrainingSpec
EvaluationJob = worker_pb2.TrainingJob.EvaluationJob
BaseModel = worker_pb2.TrainingJob.BaseModel
CLASSES = ("dump", "tire")
# The evaluation dataset's category ids: not 1..n, and "tire" first.
CATEGORY_IDS = {"tire": 3, "dump": 7}
IMAGE_SIZE = 128
SAMPLES = 2


def training_job(run_id: str, dataset_uri: str) -> worker_pb2.TrainingJob:
    """A small detector the worker trains in a minute or two on two cores."""
    return worker_pb2.TrainingJob(
        training_run=f"trainingRuns/{run_id}",
        attempt=1,
        spec=Spec(
            dataset_uri=dataset_uri,
            architecture="rtmdet_tiny",
            epochs=6,
            # Batches of 2 learn both classes sooner (docs/training.md).
            batch_size=2,
            image_size=IMAGE_SIZE,
            val_fraction=0.25,
            seed=0,
            device=Spec.CPU,
        ),
    )


def evaluation_job(
    model: BaseModel,
    dataset_uri: str,
    *,
    split: str = "test",
    batch_size: int = 4,
    seed: int = 1,
    val_fraction: float = 0.2,
    **request: Any,
) -> worker_pb2.TrainingJob:
    run_id = uuid.uuid4().hex
    fields: dict[str, Any] = {
        "score_threshold": 0.3,
        "iou_threshold": 0.5,
        "samples": SAMPLES,
        **request,
    }
    return worker_pb2.TrainingJob(
        training_run=f"trainingRuns/{run_id}",
        attempt=1,
        spec=Spec(
            dataset_uri=dataset_uri,
            architecture=model.architecture,
            batch_size=batch_size,
            image_size=IMAGE_SIZE,
            seed=seed,
            val_fraction=val_fraction,
            device=Spec.CPU,
        ),
        evaluation=EvaluationJob(
            name=f"{model.name}/evaluations/{run_id}", model=model, split=split, **fields
        ),
    )


def reshaped_dataset(folder: Path, *, images: int, seed: int) -> dict[str, Any]:
    """A COCO dataset unlike the synthetic one the model trained on: each image pasted onto
    a canvas of its own size, boxes moved with it, ids far from 1..n, category ids 7 and 3
    in reverse name order, nested file names, one image without objects, and the images'
    own "split" keys (half of them test). Its annotation file is written; its document."""
    source = json.loads(
        make_dataset(folder / "source", images=images, size=112, seed=seed).read_text()
    )
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    old_names = {c["id"]: c["name"] for c in source["categories"]}
    document: dict[str, Any] = {
        "info": {"description": "reshaped"},
        "categories": [
            {"id": CATEGORY_IDS[name], "name": name, "supercategory": "waste"}
            for name in sorted(CATEGORY_IDS, key=lambda n: CATEGORY_IDS[n])
        ],
        "images": [],
        "annotations": [],
    }
    new_ids = {}
    for index, image in enumerate(source["images"]):
        width, height = rng.randint(130, 190), rng.randint(115, 150)
        dx, dy = rng.randint(0, width - 112), rng.randint(0, height - 112)
        pixels = noise.normal(120, 18, size=(height, width, 3)).clip(0, 255).astype(np.uint8)
        canvas = Image.fromarray(pixels)
        with Image.open(folder / "source" / image["file_name"]) as tile:
            canvas.paste(tile, (dx, dy))
        new_id = 9000 + 37 * index
        new_ids[image["id"]] = (new_id, dx, dy)
        file_name = f"camera {index % 3}/2026-12/IMG_{new_id}.png"
        (folder / file_name).parent.mkdir(parents=True, exist_ok=True)
        canvas.save(folder / file_name)
        split = "test" if index % 2 else ("val" if index % 6 == 0 else "train")
        document["images"].append(
            {"id": new_id, "file_name": file_name, "width": width, "height": height, "split": split}
        )
    for annotation in source["annotations"]:
        new_id, dx, dy = new_ids[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        document["annotations"].append(
            {
                "id": 50_000 + annotation["id"],
                "image_id": new_id,
                "category_id": CATEGORY_IDS[old_names[annotation["category_id"]]],
                # Neither `area` nor `iscrowd`: COCO files in the wild leave them out.
                "bbox": [x + dx, y + dy, w, h],
            }
        )
    # An image of the test split without objects: every detection on it is a false positive.
    empty_id = 9000 + 37 * images
    canvas = Image.fromarray(
        noise.normal(120, 18, size=(121, 170, 3)).clip(0, 255).astype(np.uint8)
    )
    canvas.save(folder / "empty.png")
    document["images"].append(
        {"id": empty_id, "file_name": "empty.png", "width": 170, "height": 121, "split": "test"}
    )
    (folder / "annotations.json").write_text(json.dumps(document))
    return document


@pytest.fixture(scope="module")
async def worker(
    infrastructure: Infrastructure, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[JetStreamContext, Subjects, Path]]:
    root = tmp_path_factory.mktemp("evaluation-worker")
    environment = WorkerEnvironment(artifact_root=root, device="cpu")
    async with running_consumer(
        infrastructure.nats_url,
        namespace="evaluation",
        worker_id="evaluation-worker",
        environment=environment,
    ) as (js, subjects):
        yield js, subjects, root


@pytest.fixture(scope="module")
async def trained(
    worker: tuple[JetStreamContext, Subjects, Path],
) -> tuple[BaseModel, worker_pb2.WorkerEvent.Succeeded]:
    """A model the worker trained, as an evaluation job names it, and its run's result."""
    js, subjects, root = worker
    make_dataset(root / "datasets" / "train", images=40, size=IMAGE_SIZE, seed=11)
    run_id = await submit(
        js, subjects, training_job(uuid.uuid4().hex, "datasets/train/annotations.json")
    )
    events = await events_until_terminal(js, subjects, run_id, timeout_s=600)
    assert kinds(events)[-1] == "succeeded", events[-1]
    artifacts = {a.kind: a for a in events[-1].succeeded.artifacts}
    model = BaseModel(
        name=f"trainedModels/{run_id}",
        architecture="rtmdet_tiny",
        classes=list(CLASSES),
        checkpoint=artifacts["checkpoint"],
    )
    return model, events[-1].succeeded


@pytest.fixture(scope="module")
def model(trained: tuple[BaseModel, worker_pb2.WorkerEvent.Succeeded]) -> BaseModel:
    return trained[0]


@pytest.fixture(scope="module")
def reshaped(worker: tuple[JetStreamContext, Subjects, Path]) -> tuple[str, dict[str, Any]]:
    _, _, root = worker
    document = reshaped_dataset(root / "datasets" / "reshaped", images=24, seed=5)
    return str(root / "datasets" / "reshaped" / "annotations.json"), document


def local(artifact: common_pb2.Artifact) -> Path:
    return Path(urlparse(artifact.uri).path)


def without_heartbeats(events: list[worker_pb2.WorkerEvent]) -> list[worker_pb2.WorkerEvent]:
    return [e for e in events if e.WhichOneof("payload") != "heartbeat"]


def cocoeval(ground_truth: dict[str, Any], detections: list[dict[str, Any]]) -> COCOeval:
    """pycocotools on its own, as anyone would run it on the stored detections."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(ground_truth))
        for annotation in gt.dataset["annotations"]:
            annotation["area"] = annotation["bbox"][2] * annotation["bbox"][3]
            annotation["iscrowd"] = 0
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


async def test_an_evaluation_reports_what_cocoeval_finds_on_its_detections(
    worker: tuple[JetStreamContext, Subjects, Path],
    model: BaseModel,
    reshaped: tuple[str, dict[str, Any]],
) -> None:
    js, subjects, root = worker
    dataset_uri, document = reshaped
    job = evaluation_job(model, dataset_uri)
    run_id = await submit(js, subjects, job)

    events = without_heartbeats(await events_until_terminal(js, subjects, run_id))
    order = kinds(events)
    assert order[-1] == "succeeded", events[-1]
    assert order[:3] == ["preparing", "dataset_prepared", "running"]
    assert "progress" in order
    assert events[2].running.device == "cpu"
    last_progress = [e.progress for e in events if e.WhichOneof("payload") == "progress"][-1]
    assert last_progress.iteration == last_progress.max_iterations == 4  # 13 images, batches of 4
    summary = events[1].dataset_prepared
    assert summary.split_source == "dataset" and summary.test_image_count == 13

    succeeded = events[-1].succeeded
    artifacts = {a.name: a for a in succeeded.artifacts}
    assert len(artifacts) == len(succeeded.artifacts)
    for artifact in succeeded.artifacts:
        path = local(artifact)
        assert path.parent == root / "evaluations" / run_id
        assert path.stat().st_size == artifact.size_bytes
        assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact.sha256
    assert {name: a.kind for name, a in artifacts.items()} == {
        "detections.json": "evaluation",
        "evaluation.json": "evaluation",
        "pr-curves-iou50.png": "plot",
        "pr-curves-iou50-95.png": "plot",
        **{f"{rank}-{i}.png": "sample" for rank in ("worst", "best") for i in (1, 2)},
    }

    # The stored detections are COCO results in the dataset's own ids.
    detections = json.loads(local(artifacts["detections.json"]).read_text())
    test_images = [i for i in document["images"] if i["split"] == "test"]
    test_ids = {i["id"] for i in test_images}
    assert detections, "the trained model detects something"
    assert {d["image_id"] for d in detections} <= test_ids
    assert {d["category_id"] for d in detections} <= set(CATEGORY_IDS.values())

    # The reported metrics are pycocotools' on those detections and the test images.
    truth = {
        "images": test_images,
        "annotations": [a for a in document["annotations"] if a["image_id"] in test_ids],
        "categories": document["categories"],
    }
    expected = cocoeval(truth, detections)
    evaluation = succeeded.evaluation
    assert (evaluation.split, evaluation.image_count, evaluation.epoch) == ("test", 13, 0)
    for name, value in zip(STAT_NAMES, expected.stats, strict=True):
        assert evaluation.metrics[name] == pytest.approx(float(value), abs=1e-12), name
    assert evaluation.metrics["coco/bbox_mAP_50"] > 0, "the model finds some objects"
    precision = expected.eval["precision"]
    for k, category_id in enumerate(expected.params.catIds):
        name = next(c["name"] for c in document["categories"] if c["id"] == category_id)
        table = precision[:, :, k, 0, 2]
        assert evaluation.per_class_ap[name] == pytest.approx(float(table[table > -1].mean()))

    review = succeeded.review
    assert (review.score_threshold, review.iou_threshold) == (0.3, 0.5)
    assert (
        review.images_fingerprint
        == hashlib.sha256(
            "".join(
                f"{i['id']}\0{i['file_name']}\n" for i in sorted(test_images, key=lambda i: i["id"])
            ).encode()
        ).hexdigest()
    )
    # Labels in the dataset's category order ("tire" is id 3), then background.
    matrix = review.confusion_matrix
    assert list(matrix.labels) == ["tire", "dump", "background"]
    counts = np.array(matrix.counts).reshape(3, 3)
    objects = len(truth["annotations"])
    assert counts[:2].sum() == objects, "every object is matched or missed once"
    kept = sum(1 for d in detections if d["score"] >= 0.3)
    assert counts[:, :2].sum() == kept, "every kept detection is counted once"
    by_class = {c.class_name: c for c in review.class_counts}
    assert by_class["tire"].true_positives == counts[0, 0]
    assert by_class["dump"].false_negatives == counts[1, 0] + counts[1, 2]
    assert {(c.class_name, c.iou) for c in review.pr_curves} == {
        (name, iou) for name in CLASSES for iou in ("0.50", "0.50:0.95")
    }
    for curve in review.pr_curves:
        if curve.iou == "0.50:0.95":
            mean = sum(curve.precision) / len(curve.precision)
            assert mean == pytest.approx(evaluation.per_class_ap[curve.class_name])

    # Each sample names its picture: the image at its own size, with boxes drawn on it.
    assert [s.rank for s in review.samples] == ["worst", "worst", "best", "best"]
    sizes = {i["id"]: (i["width"], i["height"]) for i in test_images}
    annotated = {a["image_id"] for a in truth["annotations"]}
    for sample in review.samples:
        assert sample.image_id in test_ids
        assert sample.file_name == next(
            i["file_name"] for i in test_images if i["id"] == sample.image_id
        )
        with Image.open(local(artifacts[sample.artifact])) as picture:
            assert picture.format == "PNG"
            assert picture.size == sizes[sample.image_id]
            pixels = np.asarray(picture.convert("RGB"))
        assert pixels.std() > 10, "not blank"
        if sample.image_id in annotated:
            assert (pixels == TRUE_COLOUR).all(axis=-1).sum() > 20, "its true boxes are drawn"
    worst = review.samples[0]
    assert worst.false_positives + worst.false_negatives >= max(
        s.false_positives + s.false_negatives for s in review.samples
    )
    with Image.open(local(artifacts["pr-curves-iou50.png"])) as plot:
        assert plot.size == (640, 480)

    stored = json.loads(local(artifacts["evaluation.json"]).read_text())
    assert stored["images_fingerprint"] == review.images_fingerprint
    assert stored["review"]["coco"]["metrics"]["coco/bbox_mAP"] == pytest.approx(
        evaluation.metrics["coco/bbox_mAP"]
    )


async def test_the_runs_own_val_split_scores_as_its_validation_did(
    worker: tuple[JetStreamContext, Subjects, Path],
    trained: tuple[BaseModel, worker_pb2.WorkerEvent.Succeeded],
) -> None:
    """Split as the run split it, its val images give the mAP that mmdet's CocoMetric gave
    the best epoch: the same images, the same labels, the same inference. (mmdet rounds to 3
    digits and scores up to 300 detections an image, COCOeval's default 100.)"""
    js, subjects, root = worker
    model, run = trained
    job = evaluation_job(
        model, "datasets/train/annotations.json", split="val", seed=0, val_fraction=0.25
    )
    events = without_heartbeats(
        await events_until_terminal(js, subjects, await submit(js, subjects, job))
    )
    assert kinds(events)[-1] == "succeeded", events[-1]
    evaluation = events[-1].succeeded.evaluation
    assert evaluation.image_count == run.evaluation.image_count == 10
    assert run.evaluation.metrics["coco/bbox_mAP_50"] > 0
    for name in ("coco/bbox_mAP", "coco/bbox_mAP_50"):
        assert evaluation.metrics[name] == pytest.approx(run.evaluation.metrics[name], abs=0.01)
    for name, ap in run.evaluation.per_class_ap.items():
        assert evaluation.per_class_ap[name] == pytest.approx(ap, abs=0.01), name

    # The same images under other ids, category ids and category order, named as the
    # dataset's own test split: the same findings, class by class.
    relabelled = relabelled_copy(root / "datasets" / "train", root / "datasets" / "relabelled", run)
    job = evaluation_job(model, str(relabelled), split="test")
    events = without_heartbeats(
        await events_until_terminal(js, subjects, await submit(js, subjects, job))
    )
    assert kinds(events)[-1] == "succeeded", events[-1]
    again = events[-1].succeeded.evaluation
    assert again.image_count == evaluation.image_count
    assert dict(again.metrics) == pytest.approx(dict(evaluation.metrics))
    assert dict(again.per_class_ap) == pytest.approx(dict(evaluation.per_class_ap))


def relabelled_copy(source: Path, target: Path, run: worker_pb2.WorkerEvent.Succeeded) -> Path:
    """A copy of the run's dataset with image ids 5000 + 3 * id, "tire" as category 3 and
    "dump" as 7 (listed tire first), the run's val images as the dataset's test split."""
    split = next(a for a in run.artifacts if a.kind == "split")
    val = set(json.loads(local(split).read_text())["val"])
    document = json.loads((source / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in document["categories"]}
    for image in document["images"]:
        image["split"] = "test" if image["id"] in val else "train"
        image["id"] = 5000 + 3 * image["id"]
    for annotation in document["annotations"]:
        annotation["image_id"] = 5000 + 3 * annotation["image_id"]
        annotation["category_id"] = CATEGORY_IDS[names[annotation["category_id"]]]
    document["categories"] = [{"id": 3, "name": "tire"}, {"id": 7, "name": "dump"}]
    # One image of the run's train split as val: the dataset's own splits need one.
    next(i for i in document["images"] if i["split"] == "train")["split"] = "val"
    shutil.copytree(source / "images", target / "images")
    (target / "annotations.json").write_text(json.dumps(document))
    return target / "annotations.json"


async def test_other_splits_see_other_images(
    worker: tuple[JetStreamContext, Subjects, Path],
    model: BaseModel,
    reshaped: tuple[str, dict[str, Any]],
) -> None:
    js, subjects, _ = worker
    dataset_uri, document = reshaped
    fingerprints = {}
    for split in ("val", "all"):
        run_id = await submit(
            js, subjects, evaluation_job(model, dataset_uri, split=split, samples=0)
        )
        events = without_heartbeats(await events_until_terminal(js, subjects, run_id))
        assert kinds(events)[-1] == "succeeded", events[-1]
        succeeded = events[-1].succeeded
        wanted = [i for i in document["images"] if split == "all" or i["split"] == split]
        assert succeeded.evaluation.image_count == len(wanted)
        assert not succeeded.review.samples
        assert "sample" not in {a.kind for a in succeeded.artifacts}
        fingerprints[split] = succeeded.review.images_fingerprint
    assert fingerprints["val"] != fingerprints["all"]


async def test_a_cancel_request_stops_the_inference(
    worker: tuple[JetStreamContext, Subjects, Path], model: BaseModel
) -> None:
    js, subjects, root = worker
    # One image a batch over enough images that progress is reported (every 0.5 s) while
    # batches remain: the cancel arrives during inference, not after it.
    folder = root / "datasets" / "many"
    dataset_uri = str(make_dataset(folder, images=160, size=IMAGE_SIZE, seed=8))
    run_id = await submit(
        js, subjects, evaluation_job(model, dataset_uri, split="all", batch_size=1)
    )
    first = await events_until_terminal(js, subjects, run_id, stop_at="progress")
    assert kinds(first)[-1] == "progress"
    progress = first[-1].progress
    assert progress.iteration < progress.max_iterations, "inference ended before the cancel"
    await request_cancel(js, subjects, run_id)
    rest = without_heartbeats(await events_until_terminal(js, subjects, run_id, timeout_s=60))
    assert kinds(rest)[-1] == "cancelled"
    assert not (root / "evaluations" / run_id).exists()


async def test_jobs_that_cannot_be_evaluated_fail_with_their_reason(
    worker: tuple[JetStreamContext, Subjects, Path],
    model: BaseModel,
    reshaped: tuple[str, dict[str, Any]],
) -> None:
    js, subjects, root = worker
    dataset_uri, _ = reshaped
    make_dataset(root / "datasets" / "no-test", images=8, size=64, seed=2)
    no_test = str(root / "datasets" / "no-test" / "annotations.json")

    corrupt = BaseModel()
    corrupt.CopyFrom(model)
    corrupt.checkpoint.sha256 = "0" * 64
    strangers = BaseModel()
    strangers.CopyFrom(model)
    del strangers.classes[:]
    strangers.classes.extend(["crane", "barrel"])
    other_architecture = BaseModel()
    other_architecture.CopyFrom(model)
    other_architecture.architecture = "retinanet_r18_fpn"
    cases = {
        "iou": (
            evaluation_job(model, dataset_uri, iou_threshold=0.0),
            "invalid_spec",
            "evaluation.iou_threshold",
        ),
        "split": (
            evaluation_job(model, dataset_uri, split="holdout"),
            "invalid_spec",
            "evaluation.split",
        ),
        "no_test": (evaluation_job(model, no_test), "dataset_invalid", "no test split"),
        "corrupt": (evaluation_job(corrupt, dataset_uri), "checkpoint_corrupt", "0" * 64),
        "strangers": (evaluation_job(strangers, dataset_uri), "dataset_invalid", "share no class"),
        "architecture": (
            evaluation_job(other_architecture, dataset_uri),
            "checkpoint_mismatch",
            "does not fit the model",
        ),
    }
    runs = {case: await submit(js, subjects, job) for case, (job, _, _) in cases.items()}
    for case, run_id in runs.items():
        events = without_heartbeats(await events_until_terminal(js, subjects, run_id))
        assert kinds(events)[-1] == "failed", (case, kinds(events))
        failure = events[-1].failed
        _, reason, needle = cases[case]
        assert failure.reason == reason, (case, failure)
        assert needle in failure.message, (case, failure.message)
        if case in ("strangers", "architecture", "corrupt"):
            assert str(root) not in failure.message, (case, failure.message)
        assert not (root / "evaluations" / run_id).exists(), case


async def test_an_evaluation_of_an_s3_dataset_stores_its_artifacts_in_s3(
    infrastructure: Infrastructure,
    s3: S3Server,
    model: BaseModel,
    reshaped: tuple[str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    """The dataset and the findings in object storage: the ids and file names the findings
    name are the annotation file's, and no local copy stays behind."""
    dataset_uri, document = reshaped
    folder = Path(dataset_uri).parent
    for path in sorted(folder.rglob("*.*")):
        if "source" not in path.relative_to(folder).parts:
            s3.put(f"reshaped/{path.relative_to(folder).as_posix()}", path.read_bytes())
    environment = WorkerEnvironment(
        artifact_root=tmp_path,
        device="cpu",
        storage=Storage(artifact_root=tmp_path, artifact_store=s3.uri("store")),
    )
    async with running_consumer(
        infrastructure.nats_url,
        namespace="evaluation-s3",
        worker_id="evaluation-s3-worker",
        environment=environment,
    ) as (js, subjects):
        job = evaluation_job(model, s3.uri("reshaped/annotations.json"), samples=1)
        run_id = await submit(js, subjects, job)
        events = without_heartbeats(await events_until_terminal(js, subjects, run_id))
    assert kinds(events)[-1] == "succeeded", events[-1]
    succeeded = events[-1].succeeded
    prefix = s3.uri(f"store/evaluations/{run_id}/")
    for artifact in succeeded.artifacts:
        assert artifact.uri == prefix + artifact.name
        key = artifact.uri.removeprefix(f"s3://{s3.bucket}/")
        assert s3.sha256(key) == artifact.sha256
        assert len(s3.get(key)) == artifact.size_bytes
    assert not (tmp_path / "evaluations" / run_id).exists(), "the local copies are gone"
    test_images = {i["id"]: i["file_name"] for i in document["images"] if i["split"] == "test"}
    assert succeeded.evaluation.image_count == len(test_images)
    assert {(s.image_id, s.file_name) for s in succeeded.review.samples} <= set(test_images.items())
    detections = json.loads(s3.get(f"store/evaluations/{run_id}/detections.json"))
    assert {d["image_id"] for d in detections} <= set(test_images)
