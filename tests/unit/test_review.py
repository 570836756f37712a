"""Results review (trainer_worker.review): COCO metrics and PR curves exactly as
pycocotools' COCOeval computes them, a confusion matrix, counts and samples known by
hand, and pictures that show the boxes."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer_worker.review import (
    BACKGROUND,
    IOU_50,
    IOU_50_95,
    coco_metrics,
    match_detections,
    review,
    select_samples,
)
from trainer_worker.review.coco_eval import STAT_NAMES
from trainer_worker.review.render import (
    PREDICTED_COLOUR,
    TRUE_COLOUR,
    render_pr_curves,
    render_sample,
)

CLASSES = ("dump", "tire", "barrel")
# Declared but never annotated: COCOeval fills its precision with -1.
UNSEEN = "crane"
SIZES = ((97, 61), (131, 77), (53, 149), (200, 33), (75, 75), (160, 121))


def box(image_id: int, category_id: int, bbox: list[float], score: float) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def synthetic() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A ground truth of odd-sized images and detections that are partly right: shifted
    boxes, wrong classes, missed objects, duplicates and spurious boxes."""
    rng = random.Random(7)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    for image_id, (width, height) in enumerate(SIZES * 3, start=1):
        images.append(
            {"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height}
        )
        for _ in range(rng.randint(1, 4)):
            w, h = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            category = rng.randint(1, len(CLASSES))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            fate = rng.random()
            if fate < 0.2:
                continue  # missed
            dx, dy = rng.gauss(0, w / 6), rng.gauss(0, h / 6)
            wrong = fate > 0.85
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": category % len(CLASSES) + 1 if wrong else category,
                    "bbox": [x + dx, y + dy, w, h],
                    "score": round(rng.uniform(0.3, 1.0), 3),
                }
            )
            if rng.random() < 0.25:  # a duplicate, lower
                detections.append({**detections[-1], "score": detections[-1]["score"] / 2})
        if rng.random() < 0.5:  # spurious
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": rng.randint(1, len(CLASSES)),
                    "bbox": [1.0, 1.0, width / 3, height / 3],
                    "score": round(rng.uniform(0.05, 0.9), 3),
                }
            )
    # A crowded image: its 12 detections outnumber COCO's maxDets 10, not 100.
    crowded = len(images) + 1
    images.append({"id": crowded, "file_name": "crowded.png", "width": 251, "height": 203})
    for n in range(12):
        x, y = 5.0 + 20 * n, 7.0 + 10 * (n % 3)
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": crowded,
                "category_id": 1,
                "bbox": [x, y, 14.0, 12.0],
                "area": 168.0,
                "iscrowd": 0,
            }
        )
        detections.append(box(crowded, 1, [x + n % 4, y, 14.0, 12.0], 0.3 + 0.05 * n))
    categories = [{"id": i + 1, "name": n} for i, n in enumerate((*CLASSES, UNSEEN))]
    ground_truth = {"images": images, "annotations": annotations, "categories": categories}
    return ground_truth, detections


def cocoeval_directly(ground_truth: dict[str, Any], detections: list[dict[str, Any]]) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(copy.deepcopy(detections)), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def test_the_metrics_are_cocoevals_own() -> None:
    ground_truth, detections = synthetic()
    before = copy.deepcopy((ground_truth, detections))
    metrics = coco_metrics(ground_truth, detections)
    direct = cocoeval_directly(ground_truth, detections)
    assert (ground_truth, detections) == before, "the inputs are left as they were"
    assert list(metrics.metrics) == list(STAT_NAMES)
    assert list(metrics.metrics.values()) == [float(s) for s in direct.stats]
    assert 0.1 < metrics.metrics["coco/bbox_mAP"] < 0.9, "partly right, so neither 0 nor 1"
    precision = direct.eval["precision"]
    for k, name in enumerate(CLASSES):
        table = precision[:, :, k, 0, 2]
        assert metrics.per_class_ap[name] == pytest.approx(float(np.mean(table[table > -1])))
    assert metrics.per_class_ap[UNSEEN] is None
    assert metrics.image_count == len(SIZES) * 3 + 1


def test_the_map_is_the_mean_of_the_classes_that_have_ground_truth() -> None:
    metrics = coco_metrics(*synthetic())
    aps = [ap for ap in metrics.per_class_ap.values() if ap is not None]
    assert len(aps) == len(CLASSES)
    assert metrics.metrics["coco/bbox_mAP"] == pytest.approx(sum(aps) / len(aps))


def test_pr_curves_are_cocoevals_precision_at_101_recall_points() -> None:
    ground_truth, detections = synthetic()
    metrics = coco_metrics(ground_truth, detections)
    precision = cocoeval_directly(ground_truth, detections).eval["precision"]
    at_50, averaged = metrics.curves(IOU_50), metrics.curves(IOU_50_95)
    assert set(at_50) == set(averaged) == set(CLASSES), "no curve for a class without truth"
    for k, name in enumerate(CLASSES):
        for curve in (at_50[name], averaged[name]):
            assert curve.recall == pytest.approx(np.linspace(0.0, 1.0, 101))
            assert all(a >= b for a, b in zip(curve.precision, curve.precision[1:], strict=False))
        assert at_50[name].precision == pytest.approx(precision[0, :, k, 0, 2])
        assert averaged[name].precision == pytest.approx(precision[:, :, k, 0, 2].mean(axis=0))
        assert averaged[name].ap == pytest.approx(metrics.per_class_ap[name])
    assert any(c.precision[0] > 0 for c in at_50.values())
    assert any(c.precision[-1] == 0 for c in at_50.values()), "recall not reached is 0"


def test_a_dataset_without_areas_gets_them_from_its_boxes() -> None:
    ground_truth, detections = synthetic()
    without = copy.deepcopy(ground_truth)
    for annotation in without["annotations"]:
        del annotation["area"]
    assert coco_metrics(without, detections) == coco_metrics(ground_truth, detections)


def test_no_detections_score_zero_for_every_class_with_ground_truth() -> None:
    ground_truth, _ = synthetic()
    metrics = coco_metrics(ground_truth, [])
    assert metrics.metrics["coco/bbox_mAP"] == 0.0
    assert {k: v for k, v in metrics.per_class_ap.items()} == {
        **dict.fromkeys(CLASSES, 0.0),
        UNSEEN: None,
    }


def test_a_detection_of_an_unknown_image_or_class_is_refused() -> None:
    ground_truth, detections = synthetic()
    with pytest.raises(ValueError, match="image_id 999"):
        coco_metrics(ground_truth, [{**detections[0], "image_id": 999}])
    with pytest.raises(ValueError, match="category_id 9"):
        match_detections(
            ground_truth,
            [{**detections[0], "category_id": 9}],
            score_threshold=0.5,
            iou_threshold=0.5,
        )


def hand_built() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Classes A=1, B=2, C=3; every outcome's count is worked out in the tests."""
    truths = [
        (1, 1, [0, 0, 10, 10]),
        (1, 2, [20, 0, 10, 10]),
        (1, 1, [40, 0, 10, 10]),
        (2, 2, [0, 0, 10, 10]),
        (3, 1, [0, 0, 10, 10]),
        (5, 3, [0, 0, 10, 10]),
        (6, 1, [0, 0, 10, 10]),
        (6, 2, [2, 0, 10, 10]),
    ]
    detections = [
        box(1, 1, [0, 0, 10, 10], 0.9),  # TP A
        box(1, 1, [20, 0, 10, 10], 0.8),  # on B: confusion (B, A)
        box(1, 2, [0, 0, 10, 10], 0.7),  # on the A, after the 0.9 took it: FP B
        box(1, 2, [60, 0, 10, 10], 0.95),  # on nothing: FP B
        box(1, 1, [40, 0, 10, 10], 0.3),  # below the score threshold: the A is missed
        box(2, 2, [1, 0, 10, 10], 0.5),  # IoU 0.82 at exactly the threshold score: TP B
        box(5, 3, [5, 0, 10, 10], 0.9),  # IoU 1/3: FP C, and the C is missed
        box(6, 1, [2, 0, 10, 10], 0.9),  # IoU 1 with B, 0.67 with A: confusion (B, A)
        box(6, 2, [0, 0, 10, 10], 0.8),  # the B is taken: confusion (A, B)
    ]
    # Listed out of id order: samples go by errors and id, never by position.
    images = [
        {"id": i, "file_name": f"{i}.png", "width": 99, "height": 51} for i in (4, 6, 1, 3, 5, 2)
    ]
    annotations = [
        {"id": n, "image_id": i, "category_id": c, "bbox": b, "area": 100.0, "iscrowd": 0}
        for n, (i, c, b) in enumerate(truths, start=1)
    ]
    categories = [{"id": 3, "name": "C"}, {"id": 1, "name": "A"}, {"id": 2, "name": "B"}]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def test_the_confusion_matrix_has_every_outcome_in_its_cell() -> None:
    matching = match_detections(*hand_built(), score_threshold=0.5, iou_threshold=0.5)
    confusion = matching.confusion
    assert confusion.labels == ("A", "B", "C", BACKGROUND)
    assert confusion.counts == (
        (1, 1, 0, 2),
        (2, 1, 0, 0),
        (0, 0, 0, 1),
        (0, 2, 1, 0),
    )
    assert confusion.cell("B", "A") == 2
    assert (confusion.score_threshold, confusion.iou_threshold) == (0.5, 0.5)


def test_tp_fp_fn_per_class_follow_from_the_matrix() -> None:
    matching = match_detections(*hand_built(), score_threshold=0.5, iou_threshold=0.5)
    assert [(c.class_name, c.tp, c.fp, c.fn) for c in matching.per_class] == [
        ("A", 1, 2, 3),
        ("B", 1, 3, 2),
        ("C", 0, 1, 1),
    ]


def test_the_thresholds_change_the_outcome() -> None:
    ground_truth, detections = hand_built()
    loose = match_detections(ground_truth, detections, score_threshold=0.2, iou_threshold=0.3)
    # The 0.3 detection now finds its A; the shifted C (IoU 1/3) is a true positive.
    assert [(c.tp, c.fp, c.fn) for c in loose.per_class] == [(2, 2, 2), (1, 3, 2), (1, 0, 0)]


def test_a_tie_in_iou_goes_to_the_lower_annotation_id_and_the_threshold_is_inclusive() -> None:
    images = [{"id": 1, "file_name": "1.png", "width": 40, "height": 20}]
    annotations = [
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [10, 0, 10, 10]},
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
        # A crowd takes no part, as in COCOeval: not a missed object.
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [30, 0, 10, 10], "iscrowd": 1},
    ]
    categories = [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}]
    ground_truth = {"images": images, "annotations": annotations, "categories": categories}
    # IoU 1/3 with either box.
    detections = [box(1, 2, [5, 0, 10, 10], 0.9)]
    matching = match_detections(ground_truth, detections, score_threshold=0.5, iou_threshold=0.3)
    assert matching.confusion.counts == ((0, 1, 0), (0, 0, 1), (0, 0, 0))
    # IoU exactly 0.5 matches at 0.5, as in COCOeval.
    half = [box(1, 1, [0, 0, 10, 5], 0.9)]
    matching = match_detections(ground_truth, half, score_threshold=0.5, iou_threshold=0.5)
    assert matching.counts("A").tp == 1


def test_per_image_errors_and_the_worst_and_best_images() -> None:
    matching = match_detections(*hand_built(), score_threshold=0.5, iou_threshold=0.5)
    errors = {i.image_id: (i.tp, i.fp, i.fn, i.errors) for i in matching.per_image}
    assert errors == {
        1: (1, 3, 2, 5),
        2: (1, 0, 0, 0),
        3: (0, 0, 1, 1),
        4: (0, 0, 0, 0),
        5: (0, 1, 1, 2),
        6: (0, 2, 2, 4),
    }
    two = select_samples(matching.per_image, k=2)
    assert [i.image_id for i in two.worst] == [1, 6]
    assert [i.image_id for i in two.best] == [2, 4], "a tie at 0 errors goes to the lower id"
    four = select_samples(matching.per_image, k=4)
    assert [i.image_id for i in four.worst] == [1, 6, 5, 3]
    assert [i.image_id for i in four.best] == [2, 4], "never an image twice"


def test_the_counts_add_up_on_the_synthetic_set() -> None:
    ground_truth, detections = synthetic()
    matching = match_detections(ground_truth, detections, score_threshold=0.4, iou_threshold=0.5)
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    for counts in matching.per_class:
        truths = sum(
            names[a["category_id"]] == counts.class_name for a in ground_truth["annotations"]
        )
        kept = sum(
            names[d["category_id"]] == counts.class_name and d["score"] >= 0.4 for d in detections
        )
        assert (counts.tp + counts.fn, counts.tp + counts.fp) == (truths, kept)
    assert sum(i.tp for i in matching.per_image) == sum(c.tp for c in matching.per_class) > 0


def test_a_review_is_stored_as_json() -> None:
    result = review(*synthetic(), score_threshold=0.4, iou_threshold=0.5, samples=2)
    stored = json.loads(json.dumps(result.to_json()))
    assert stored["coco"]["per_class_ap"][UNSEEN] is None
    assert stored["coco"]["metrics"]["coco/bbox_mAP"] == result.coco.metrics["coco/bbox_mAP"]
    assert len(stored["coco"]["pr_curves"]) == 2 * len(CLASSES)
    assert stored["matching"]["confusion"]["labels"][-1] == BACKGROUND
    assert [s["image_id"] for s in stored["samples"]["worst"]] == [
        i.image_id for i in result.samples.worst
    ]
    assert len(result.samples.best) == 2


def colour_pixels(png: bytes, colour: tuple[int, int, int]) -> int:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    return int((pixels == colour).all(axis=1).sum())


def test_a_sample_shows_true_and_predicted_boxes_in_their_colours() -> None:
    image = Image.new("RGB", (97, 61), (120, 120, 120))
    names = {1: "dump", 2: "tire"}
    truths = [{"category_id": 1, "bbox": [10, 20, 30, 25]}]
    predicted = [box(1, 2, [50, 5, 40, 30], 0.87), box(1, 1, [0, 0, 5, 5], 0.1)]
    for scale, size in ((1.0, (97, 61)), (2.0, (194, 122))):
        png = render_sample(
            image,
            truths=truths,
            detections=predicted,
            class_names=names,
            score_threshold=0.5,
            scale=scale,
        )
        opened = Image.open(io.BytesIO(png))
        assert (opened.format, opened.size) == ("PNG", size)
        assert np.asarray(opened).var() > 0
        assert colour_pixels(png, TRUE_COLOUR) > 0
        assert colour_pixels(png, PREDICTED_COLOUR) > 0
        rgb = opened.convert("RGB")
        # The left edge of each box, below its label.
        assert rgb.getpixel((round(10 * scale), round(32 * scale))) == TRUE_COLOUR
        assert rgb.getpixel((round(50 * scale), round(12 * scale))) == PREDICTED_COLOUR
        assert rgb.getpixel((round(10 * scale), round(32 * scale))) != PREDICTED_COLOUR
    bare = render_sample(
        image, truths=[], detections=predicted[1:], class_names=names, score_threshold=0.5
    )
    assert colour_pixels(bare, TRUE_COLOUR) == colour_pixels(bare, PREDICTED_COLOUR) == 0


def test_the_pr_plot_is_an_image_with_its_curves() -> None:
    curves = coco_metrics(*synthetic()).pr_curves
    png = render_pr_curves(curves, title="val", width_px=640, height_px=480)
    opened = Image.open(io.BytesIO(png))
    assert (opened.format, opened.size) == ("PNG", (640, 480))
    assert np.asarray(opened.convert("RGB")).var() > 0
    # matplotlib's first line colour, C0.
    assert colour_pixels(png, (31, 119, 180)) > 0
    empty = render_pr_curves([], width_px=320, height_px=240)
    assert colour_pixels(empty, (31, 119, 180)) == 0


def test_importing_the_review_loads_no_plotting_library() -> None:
    code = "import sys, trainer_worker.review; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
